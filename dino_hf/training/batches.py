"""The batches of a training run, pass after pass over the stream, with a position a checkpoint keeps,
and their way to the device."""

import contextlib

import torch

from ..data.loader import starting_workers


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
            self._batches = self._start_pass()
        try:
            return next(self._batches)
        except StopIteration:
            pass  # the pass is over (a resumed one may have had nothing left): start the next data epoch
        self.epoch += 1
        self.loader.dataset.set_epoch(self.epoch)
        self._batches = self._start_pass()
        try:
            return next(self._batches)
        except StopIteration:
            raise ValueError("the training stream gave no complete batch; use a smaller batch or more data") from None

    def _start_pass(self):
        """The loader's iterator; its workers start with the stop signals left to them (`starting_workers`)."""
        with starting_workers():
            return iter(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.loader.dataset.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._batches = None


class DeviceBatches:
    """The batches of `EndlessBatches` on the device, the next one copied (and, with `multicrop`,
    cropped) while the current step computes.

    On CUDA the copy (from pinned memory, non-blocking) and `BatchMultiCrop` of the batch after the
    one handed out run on a side stream; the step's stream waits for them by an event. As the step
    reads nothing back from the device, the host queues them while the device still runs the
    previous step, so they overlap it. Elsewhere the same work runs in order on the one stream, so a
    run makes the same batches with and without the overlap (`prefetch=False`).

    Each item is `(crops, batch)`: the crops on the device, `[global 1, global 2, local ...]`, and
    the loader's batch (its `ids`, `skipped` and `stream_retries`; with iBOT, its `masks` on the device,
    copied like the crops). The crops of `multicrop` draw
    from a generator seeded by the step and the process, so that a resumed run makes the same ones
    without saved state. `state_dict()` is the position after the last batch handed out: a
    prefetched batch is not counted, and a resumed run reads it again.
    """

    def __init__(
        self,
        batches: EndlessBatches,
        device: torch.device,
        *,
        multicrop=None,
        seed: int = 0,
        process_index: int = 0,
        prefetch: bool = True,
    ):
        self.batches, self.device, self.multicrop, self.prefetch = batches, torch.device(device), multicrop, prefetch
        self.seed, self.process_index = seed, process_index
        self.step = 0  # the step of the next batch handed out
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and prefetch else None
        self._generator = torch.Generator(device=self.device) if multicrop is not None else None
        self._ahead = None
        self._position = None  # the loader's position after the last batch handed out

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> tuple[list[torch.Tensor], dict]:
        current = self._ahead if self._ahead is not None else self._fetch(self.step)
        self._ahead = self._fetch(self.step + 1) if self.prefetch else None
        crops, batch, self._position, ready = current
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for tensor in [*crops, *batch.get("masks", ())]:  # made on the side stream, used on this one
                tensor.record_stream(stream)
        self.step += 1
        return crops, batch

    def _fetch(self, step: int) -> tuple:
        batch = next(self.batches)
        position = self.batches.state_dict()
        context = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with context:
            crops = [crop.to(self.device, non_blocking=True) for crop in batch["crops"]]
            if "masks" in batch:  # iBOT's masks (`PatchMasks`), drawn by the workers
                batch = {**batch, "masks": batch["masks"].to(self.device, non_blocking=True)}
            if self.multicrop is not None:
                self._generator.manual_seed(self.seed * 1_000_003 + self.process_index * 10_007 + step)
                crops = self.multicrop(crops[0], self._generator)
            ready = torch.cuda.Event() if self._stream is not None else None
            if ready is not None:
                ready.record(self._stream)
        return crops, batch, position, ready

    def state_dict(self) -> dict:
        return self._position if self._position is not None else self.batches.state_dict()

    def load_state_dict(self, state: dict | None, step: int) -> None:
        """Continue after a checkpoint written at `step`, from the data position `state` (None: from
        the beginning of the stream, as when the checkpoint was written by another number of
        processes)."""
        if state is not None:
            self.batches.load_state_dict(state)
        self.step, self._ahead, self._position = step, None, None


__all__ = ["DeviceBatches", "EndlessBatches"]
