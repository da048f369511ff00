"""Streaming image sources for DINO pretraining, and the resumable multi-crop loader.

`load_image_stream` turns a source (a Hub dataset id, a local folder of images, parquet / arrow
files, webdataset `.tar` shards) into a `datasets.IterableDataset` whose image column is left
undecoded, split across processes with `split_dataset_by_node`; `decode_image`
(`dino_hf.decoding`) decodes it later, skipping bad images. `build_multicrop_dataloader` wraps the
stream in `MultiCropStream` (`dino_hf.multicrop_stream`: shuffle blocks, decoding, multi-crop,
retried reads) and a torchdata `StatefulDataLoader`, so that the stream position is part of the
training state; `SkipReport` adds up the skipped images that the batches report.
"""

import functools
import logging
import math
import os
import signal
import threading
from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np
import torch
from datasets import ClassLabel, Features, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from .decoding import DEFAULT_MAX_PIXELS
from .multicrop_stream import MultiCropStream

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
_MAX_FILES_PER_SHARD = 1024
_MIN_SHARDS = 256
# The signals that stop a run. SLURM, `timeout` and a terminal's Ctrl-C send them to every process of
# the job, workers included; the main process handles them (`checkpointing.PreemptionSignals`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def load_image_stream(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    split: str = "train",
    train_dir: Optional[str] = None,
    data_files: Union[str, Sequence[str], None] = None,
    image_column_name: Optional[str] = None,
    streaming: bool = True,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    token: Union[str, bool, None] = None,
) -> tuple:
    """Opens one image source as an `IterableDataset` and names its image column.

    Give exactly one of:
        dataset_name: a Hub dataset id (or a local dataset folder), with `dataset_config_name` and
            `split`, read with `load_dataset(..., streaming=streaming)`; without streaming the
            dataset is downloaded and then iterated as 64 shards.
        train_dir: a local folder: images (flat or nested; class sub-folders become a `label`
            column), or parquet / arrow / webdataset `.tar` files.
        data_files: a path, glob or list of parquet, arrow, `.tar` or image files.

    The image column is `image_column_name`, else the column with the `Image` feature, else the
    first of IMAGE_COLUMN_NAMES present. Its `Image` feature is set to `decode=False` so that
    `decode_image` decodes (and skips bad files) instead of `datasets`. With `world_size > 1` the
    stream keeps this process's part (`split_dataset_by_node`). Local image files are listed once,
    shuffled with `seed` and grouped into shards, so that workers and processes get disjoint,
    class-mixed parts.

    Returns:
        `(stream, image_column)`.
    """
    given = [name for name, value in (("dataset_name", dataset_name), ("train_dir", train_dir), ("data_files", data_files)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one of dataset_name, train_dir, data_files; got {given or 'none'}")
    if dataset_name:
        stream = load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming, token=token)
        if not streaming:
            stream = stream.to_iterable_dataset(num_shards=min(64, len(stream)))
    else:
        files = _list_files(train_dir) if train_dir else _expand_data_files(data_files)
        stream = _open_files(files, split, seed, world_size, source=train_dir or data_files)
    image_column = find_image_column(stream, image_column_name)
    feature = (stream.features or {}).get(image_column)
    if isinstance(feature, ImageFeature) and feature.decode:
        stream = stream.cast_column(image_column, ImageFeature(decode=False))
    if world_size > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return stream, image_column


def find_image_column(stream: IterableDataset, image_column_name: Optional[str] = None) -> str:
    """The name of the image column of `stream` (see `load_image_stream`); raises listing the columns."""
    features = stream.features
    columns = list(features) if features is not None else list(next(iter(stream), {}).keys())
    if image_column_name:
        if image_column_name not in columns:
            raise ValueError(f"image column {image_column_name!r} not found; the columns are {columns}")
        return image_column_name
    if features is not None:
        for name, feature in features.items():
            if isinstance(feature, ImageFeature):
                return name
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    raise ValueError(
        f"no image column found among {columns}: none has the Image feature or a usual name "
        f"{list(IMAGE_COLUMN_NAMES)}; pass --image_column_name"
    )


def _list_files(root: str) -> list:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"train_dir {root!r} is not a folder")
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files += [os.path.join(folder, name) for name in sorted(names) if not name.startswith(".")]
    return files


def _expand_data_files(data_files: Union[str, Sequence[str]]) -> list:
    import glob

    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.fspath(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"data_files: nothing matches {pattern!r}")
        files += [m for m in matches if os.path.isfile(m)]
    return files


def _open_files(files: list, split: str, seed: int, world_size: int, source) -> IterableDataset:
    """A stream over local files: table files through their `datasets` builder, images directly."""
    by_extension = Counter(os.path.splitext(f)[1].lower() for f in files)
    for extension, builder in _TABLE_BUILDERS.items():
        if by_extension[extension]:
            tables = [f for f in files if f.lower().endswith(extension)]
            return load_dataset(builder, data_files={split: tables}, split=split, streaming=True)
    images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    ignored = {ext or "(none)": n for ext, n in by_extension.items() if ext not in IMAGE_EXTENSIONS}
    if ignored:
        logger.warning(f"{source}: ignored {sum(ignored.values())} files without an image extension: {ignored}")
    if not images:
        raise ValueError(f"{source}: no image, parquet, arrow or .tar files found")
    return _image_files_stream(images, os.path.commonpath([os.path.dirname(f) for f in images]), seed, world_size)


def _image_files_stream(images: list, root: str, seed: int, world_size: int) -> IterableDataset:
    """Image files as a stream of `{"image": {"path", "bytes": None}, ["label"]}` rows.

    The `imagefolder` builder would give one shard (no parallel workers) and decode in `datasets`,
    so the files are shuffled once and dealt into shards here; files in class sub-folders of
    `root` get the folder name as label.
    """
    relative = [os.path.relpath(f, root).split(os.sep) for f in images]
    labelled = all(len(parts) > 1 for parts in relative)
    class_names = sorted({parts[0] for parts in relative}) if labelled else []
    labels = [class_names.index(parts[0]) for parts in relative] if labelled else [-1] * len(images)
    order = np.random.default_rng(seed).permutation(len(images))
    num_shards = min(len(images), max(_MIN_SHARDS, math.ceil(len(images) / _MAX_FILES_PER_SHARD)))
    num_shards = world_size * math.ceil(num_shards / world_size)
    shards = [[(images[i], labels[i]) for i in order[k::num_shards]] for k in range(num_shards)]
    features = {"image": ImageFeature(decode=False)}
    if labelled:
        features["label"] = ClassLabel(names=class_names)
    return IterableDataset.from_generator(
        _read_image_shards, features=Features(features), gen_kwargs={"shards": shards, "labelled": labelled}
    )


def _read_image_shards(shards: list, labelled: bool):
    for shard in shards:
        for path, label in shard:
            yield {"image": {"path": path, "bytes": None}, "label": label} if labelled else {"image": {"path": path, "bytes": None}}


def collate_multicrop(samples: list) -> dict:
    """Stacks samples of `MultiCropStream`: `{"crops": [2 x (B, 3, G, G), N x (B, 3, L, L)],
    "ids": [B str], "skipped": {reason: count}, "stream_retries": int}` (the retried stream reads
    reported by these samples; samples without the key count 0)."""
    crops = [torch.stack(views) for views in zip(*(s["crops"] for s in samples))]
    skipped = Counter()
    for sample in samples:
        skipped.update(sample["skipped"])
    retries = sum(s.get("stream_retries", 0) for s in samples)
    return {"crops": crops, "ids": [s["id"] for s in samples], "skipped": dict(skipped), "stream_retries": retries}


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
    id_column: Optional[str] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    pin_memory: bool = False,
    max_retries: int = 5,
    retry_delay: float = 1.0,
    max_retry_delay: float = 60.0,
) -> StatefulDataLoader:
    """A resumable loader of multi-crop batches (see `collate_multicrop`) from `stream`.

    `loader.state_dict()` / `loader.load_state_dict(state)` save and restore the position, also
    with workers. Workers beyond the stream's number of shards would get no data and are not
    started. Call `loader.dataset.set_epoch(epoch)` before each epoch. `seed` should differ
    between processes (e.g. seed + rank). Transient read failures of the stream are retried in
    place (`max_retries`, `retry_delay`, `max_retry_delay`: see `MultiCropStream`) and counted in
    `batch["stream_retries"]`. Workers ignore the SIGTERM, SIGUSR1 and SIGINT that other processes
    send them (`ignore_stop_signals`).
    """
    dataset = MultiCropStream(
        stream, image_column, transform, seed, shuffle_buffer_size, id_column, max_pixels, min_side,
        max_retries=max_retries, retry_delay=retry_delay, max_retry_delay=max_retry_delay,
    )
    if num_workers > stream.num_shards:
        logger.warning(f"the stream has {stream.num_shards} shards: using {stream.num_shards} workers, not {num_workers}")
        num_workers = stream.num_shards
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_multicrop,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(ignore_stop_signals, main_process=os.getpid()),
    )
