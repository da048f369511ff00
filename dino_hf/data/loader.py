"""The resumable multi-crop loader of a training run.

`build_multicrop_dataloader` wraps an image stream (`dino_hf.data.sources.load_image_stream`) in
`MultiCropStream` (`dino_hf.data.stream`: shuffle blocks, decoding, multi-crop, retried reads) and a
torchdata `StatefulDataLoader`, so that the stream position is part of the training state;
`SkipReport` adds up the skipped images that the batches report. The workers leave the signals that
stop a run (`STOP_SIGNALS`) to the main process.
"""

import contextlib
import functools
import logging
import os
import signal
import threading
import warnings
from collections import Counter

import torch
from datasets import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from .decoding import DEFAULT_MAX_PIXELS
from .masks import BlockMasking
from .stream import MultiCropStream

logger = logging.getLogger(__name__)

# The signals that stop a run. SLURM, `timeout` and a terminal's Ctrl-C send them to every process of
# the job, workers included; the main process handles them (`checkpointing.PreemptionSignals`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def collate_multicrop(samples: list, masks: BlockMasking | None = None) -> dict:
    """Stacks samples of `MultiCropStream`: `{"crops": [2 x (B, 3, G, G), N x (B, 3, L, L)],
    "ids": [B str], "skipped": {reason: count}, "stream_retries": int}` (the retried stream reads
    reported by these samples; samples without the key count 0). With `masks` (iBOT), also
    `"masks"`: the batch's `PatchMasks`, drawn from the seeds of the samples (`SeededCrops`)."""
    crops = [torch.stack(views) for views in zip(*(s["crops"] for s in samples))]
    skipped = Counter()
    for sample in samples:
        skipped.update(sample["skipped"])
    retries = sum(s.get("stream_retries", 0) for s in samples)
    batch = {"crops": crops, "ids": [s["id"] for s in samples], "skipped": dict(skipped), "stream_retries": retries}
    if masks is not None:
        batch["masks"] = masks([s["crops"].seed for s in samples])
    return batch


class SeededCrops(list):
    """The crops of one sample, with `seed`: the seed of the generator its augmentation drew from,
    which is the sample's position in the stream (`MultiCropStream`), so that what is drawn from it
    again in the worker (the batch's masks) is the same in a resumed run."""

    def __init__(self, crops: list, seed: int):
        super().__init__(crops)
        self.seed = seed


class KeepSeed:
    """A `transform(image, generator)` whose crops come back as `SeededCrops`, carrying the generator's
    seed to `collate_multicrop`; the crops themselves are the transform's."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, generator: torch.Generator) -> SeededCrops:
        return SeededCrops(self.transform(image, generator), generator.initial_seed())


class SkipReport:
    """Adds up the `skipped` counts of batches; warns once per reason, the first time it is seen."""

    def __init__(self):
        self.counts = Counter()

    def update(self, skipped: dict) -> None:
        for reason, count in skipped.items():
            if count and reason not in self.counts:
                logger.warning(f"skipping images that are {reason.replace('_', ' ')}; counts are in the log summary")
            self.counts[reason] += count

    def summary(self) -> str:
        if not self.counts:
            return "no images skipped"
        return "skipped images: " + ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))


def ignore_stop_signals(worker_id: int, main_process: int) -> None:
    """The loader's `worker_init_fn`: the worker ignores STOP_SIGNALS, so that a signal sent to the
    whole job reaches the main process alone, which checkpoints and then shuts its workers down. A
    SIGTERM from `main_process` (the pid of the main process: how it ends workers that do not stop
    when asked, also when it exits on an error) still ends the worker, as PyTorch's own worker
    handler does. A worker whose main process is gone exits by itself.

    The signals are blocked and taken by a thread that sees their sender (`sigwaitinfo`); where
    there is no `sigwaitinfo` (macOS), the worker keeps PyTorch's handling.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, args=(main_process,), name="stop-signals", daemon=True).start()


@contextlib.contextmanager
def starting_workers():
    """Hold STOP_SIGNALS back from the calling thread while a loader starts its workers (`iter(loader)`).

    A worker forked meanwhile inherits the block, so a signal sent to the whole job while the worker
    starts waits for `ignore_stop_signals` to take it, rather than ending the worker before that runs (the
    loader would then fail, and the run with it, without a checkpoint). A signal that reaches the main
    process meanwhile is handled once the block ends, or at once by another of its threads. Only the main
    thread, and where `ignore_stop_signals` takes the signals (`sigwaitinfo`); elsewhere, nothing changes.
    """
    if not hasattr(signal, "sigwaitinfo") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _take_stop_signals(main_process: int) -> None:
    while True:
        received = signal.sigwaitinfo(STOP_SIGNALS)
        if received.si_signo == signal.SIGTERM and received.si_pid == main_process:
            os._exit(0)


def build_multicrop_dataloader(
    stream: IterableDataset,
    image_column: str,
    transform,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer_size: int = 1000,
    drop_last: bool = True,
    id_column: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    pin_memory: bool = False,
    max_retries: int = 5,
    retry_delay: float = 1.0,
    max_retry_delay: float = 60.0,
    masks: BlockMasking | None = None,
) -> StatefulDataLoader:
    """A resumable loader of multi-crop batches (see `collate_multicrop`) from `stream`.

    `loader.state_dict()` / `loader.load_state_dict(state)` save and restore the position, also
    with workers. Workers beyond the stream's number of shards would get no data and are not
    started. Call `loader.dataset.set_epoch(epoch)` before each epoch. `seed` should differ
    between processes (e.g. seed + rank). Transient read failures of the stream are retried in
    place (`max_retries`, `retry_delay`, `max_retry_delay`: see `MultiCropStream`) and counted in
    `batch["stream_retries"]`. Workers ignore the SIGTERM, SIGUSR1 and SIGINT that other processes
    send them (`ignore_stop_signals`). With `masks` (iBOT), each batch also carries its block masks
    (`collate_multicrop`), drawn in the workers and seeded by the positions of its samples.
    """
    dataset = MultiCropStream(
        stream,
        image_column,
        transform if masks is None else KeepSeed(transform),
        seed,
        shuffle_buffer_size,
        id_column,
        max_pixels,
        min_side,
        max_retries=max_retries,
        retry_delay=retry_delay,
        max_retry_delay=max_retry_delay,
    )
    if num_workers > stream.num_shards:
        logger.warning(
            f"the stream has {stream.num_shards} shards: using {stream.num_shards} workers, not {num_workers}"
        )
        num_workers = stream.num_shards
    with warnings.catch_warnings():
        # torchdata's constructor calls torch.set_vital, which recent torch releases deprecate.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_multicrop if masks is None else functools.partial(collate_multicrop, masks=masks),
            drop_last=drop_last,
            pin_memory=pin_memory,
            worker_init_fn=functools.partial(ignore_stop_signals, main_process=os.getpid()),
        )


__all__ = [
    "STOP_SIGNALS",
    "KeepSeed",
    "SeededCrops",
    "SkipReport",
    "build_multicrop_dataloader",
    "collate_multicrop",
    "ignore_stop_signals",
    "starting_workers",
]
