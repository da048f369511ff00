"""The batches of a training run, pass after pass over the stream, with a position a checkpoint keeps."""

class EndlessBatches:
    """The batches of a resumable loader, pass after pass; each pass over the stream is one data
    epoch, re-shuffled through `set_epoch`.

    `state_dict()` (the data epoch and the loader's position) is what each process saves in a
    checkpoint, so that a resumed run reads the same batches as an uninterrupted one, also when it
    stopped right after the last batch of a pass.
    """

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self._batches = None

    def __iter__(self) -> "EndlessBatches":
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._batches = iter(self.loader)
        try:
            return next(self._batches)
        except StopIteration:
            pass  # the pass is over (a resumed one may have had nothing left): start the next data epoch
        self.epoch += 1
        self.loader.dataset.set_epoch(self.epoch)
        self._batches = iter(self.loader)
        try:
            return next(self._batches)
        except StopIteration:
            raise ValueError(
                "the training stream gave no complete batch; use a smaller batch or more data"
            ) from None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.loader.dataset.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._batches = None


__all__ = ["EndlessBatches"]
