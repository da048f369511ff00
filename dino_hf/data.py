"""Streaming image sources for DINO pretraining, with safe decoding and a resumable multi-crop loader.

`load_image_stream` turns a source (a Hub dataset id, a local folder of images, parquet / arrow
files, webdataset `.tar` shards) into a `datasets.IterableDataset` whose image column is left
undecoded, split across processes with `split_dataset_by_node`. `decode_image` turns one value of
that column into an RGB PIL image or None, counting why it skipped. `build_multicrop_dataloader`
wraps the stream in `MultiCropStream` (shuffle buffer, decoding, multi-crop) and a torchdata
`StatefulDataLoader`, so that the stream position is part of the training state. A read of the
stream that fails for a passing reason (`is_transient_stream_error`) is retried from the last
block's position with back-off.
"""

import errno
import io
import logging
import math
import os
import time
import warnings
from collections import Counter
from itertools import islice
from typing import Optional, Sequence, Union

import numpy as np
import torch
from datasets import ClassLabel, Features, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from PIL import Image, ImageOps
from torchdata.stateful_dataloader import StatefulDataLoader

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
# PIL's own limit (about 89.5 M pixels, a 9459 x 9459 image); PIL refuses outright above twice it.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
_TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
_MAX_FILES_PER_SHARD = 1024
_MIN_SHARDS = 256

# Stream read failures that `MultiCropStream` retries (see `is_transient_stream_error`).
RETRIED_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH") if hasattr(errno, name)
)
# Transport errors of the HTTP clients under fsspec, datasets and huggingface_hub, as (top-level
# module, class name) so that none of those clients has to be installed or imported here.
_CLIENT_TRANSPORT_ERRORS = frozenset(
    [(client, name) for client in ("httpx", "httpx2") for name in ("TimeoutException", "NetworkError", "RemoteProtocolError")]
    + [("requests", "ConnectionError"), ("requests", "Timeout"), ("requests", "ChunkedEncodingError")]
    + [("aiohttp", "ClientConnectionError"), ("aiohttp", "ClientPayloadError")]
    + [("urllib3", "ProtocolError"), ("urllib3", "ReadTimeoutError")]
)
# Subclasses of ConnectionError that no retry can fix.
_PERMANENT_ERRORS = frozenset(
    [("huggingface_hub", "OfflineModeIsEnabled")]
    + [("datasets", "DatasetNotOnHfGcsError"), ("datasets", "MissingFilesOnHfGcsError")]
)


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


def decode_image(
    value,
    skipped: Optional[Counter] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
) -> Optional[Image.Image]:
    """Decodes one image-column value to an RGB PIL image, or returns None and counts why.

    `value` is what an undecoded `Image` column holds (`{"bytes", "path"}`), raw bytes, a file
    path or a PIL image. The EXIF orientation is applied. Modes with alpha (LA, RGBA, PA, P with
    transparency) are composited on white; 16-bit and 32-bit integer modes are scaled to 8 bits,
    float (F) images in [0, 1] are scaled by 255 and others clipped to [0, 255]; CMYK, YCbCr and
    the rest go through PIL's conversion. Skip reasons counted in `skipped`: "zero_byte",
    "missing_file", "not_an_image", "truncated", "corrupt", "too_large" (more than `max_pixels`,
    or PIL's decompression-bomb limit), "too_small" (a side under `min_side`), "no_image_value".
    """
    image, reason = _decode(value, max_pixels, min_side)
    if reason is not None and skipped is not None:
        skipped[reason] += 1
    return image


def _decode(value, max_pixels: Optional[int], min_side: int) -> tuple:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        source = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            return None, "zero_byte"
        source = io.BytesIO(value)
    elif isinstance(value, (str, os.PathLike)):
        if not os.path.exists(value) and "://" not in os.fspath(value):
            return None, "missing_file"
        if "://" not in os.fspath(value) and os.path.getsize(value) == 0:
            return None, "zero_byte"
        source = value
    else:
        return None, "no_image_value"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = source if isinstance(source, Image.Image) else _open(source)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                return None, "too_large"
            if min(width, height) < min_side:
                return None, "too_small"
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except Image.UnidentifiedImageError:
        return None, "not_an_image"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return None, "truncated" if "truncat" in str(error).lower() else "corrupt"


def _open(source) -> Image.Image:
    if isinstance(source, str) and "://" in source:
        from datasets.utils.file_utils import xopen

        with xopen(source, "rb") as f:
            return Image.open(io.BytesIO(f.read()))
    return Image.open(source)


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts a loaded PIL image of any mode to RGB (see `decode_image`)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.float64) / 257.0  # 16-bit range onto 8 bits
    elif image.mode == "I":
        array = np.asarray(image).astype(np.float64)
        array = np.clip(array, 0, 65535) / 257.0 if array.size and array.max() > 255 else np.clip(array, 0, 255)
    elif image.mode == "F":
        array = np.nan_to_num(np.asarray(image).astype(np.float64))
        array = np.clip(array * 255.0 if array.size and 0.0 <= array.min() and array.max() <= 1.0 else array, 0, 255)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.round(array).astype(np.uint8)).convert("RGB")


class StreamReadError(RuntimeError):
    """A stream read that still failed after `MultiCropStream`'s retries; the last failure is its `__cause__`."""


def is_transient_stream_error(error: BaseException) -> bool:
    """Whether a failure to read a stream may pass, so that reading again from the same position is worth it.

    Transient, checked on `error` and on each explicit cause (`raise ... from`) behind it:
    - `ConnectionError` (reset, aborted, refused, broken pipe; also what `datasets` raises when its
      own read retries give up) and `TimeoutError` (also `socket.timeout`, `asyncio.TimeoutError`);
    - an `OSError` with a network errno (ENETDOWN, ENETUNREACH, ENETRESET, EHOSTDOWN, EHOSTUNREACH);
    - transport errors of the HTTP clients: httpx `TimeoutException`, `NetworkError`,
      `RemoteProtocolError`; requests `ConnectionError`, `Timeout`, `ChunkedEncodingError`; aiohttp
      `ClientConnectionError`, `ClientPayloadError`; urllib3 `ProtocolError`, `ReadTimeoutError`;
    - an HTTP error (huggingface_hub's `HfHubHTTPError`, requests, httpx, aiohttp) whose status is
      one of RETRIED_HTTP_STATUSES: 408, 429 (rate limit), 500, 502, 503, 504.

    Not transient: everything else, notably missing or forbidden files (`FileNotFoundError`,
    `PermissionError`), other 4xx statuses (a wrong dataset id or token), huggingface_hub's
    `OfflineModeIsEnabled`, and bad data (an unreadable table; an undecodable image never gets
    here: `decode_image` skips it).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        classes = {(c.__module__.split(".")[0], c.__name__) for c in type(error).__mro__}
        if classes & _PERMANENT_ERRORS or isinstance(error, StreamReadError):  # retries already spent
            return False
        if _is_transient(error, classes):
            return True
        error = error.__cause__
    return False


def _is_transient(error: BaseException, classes: set) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)) or classes & _CLIENT_TRANSPORT_ERRORS:
        return True
    if isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS:
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)  # huggingface_hub, requests, httpx
    if status is None and ("aiohttp", "ClientResponseError") in classes:
        status = getattr(error, "status", None)
    return status in RETRIED_HTTP_STATUSES


def _describe_stream(stream: IterableDataset) -> str:
    """A short name of a stream's source for messages: dataset or builder name, config, split, shards."""
    info = getattr(stream, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or type(stream).__name__
    config = getattr(info, "config_name", None)
    parts = [f"config {config}"] if config and config != "default" else []
    if getattr(stream, "split", None):
        parts.append(f"split {stream.split}")
    if getattr(stream, "num_shards", None):
        parts.append(f"{stream.num_shards} shards")
    return f"{name!r} ({', '.join(parts)})" if parts else repr(name)


class MultiCropStream(torch.utils.data.IterableDataset):
    """Decoded, augmented samples of a stream, in an order that a checkpoint can resume exactly.

    Rows are read in blocks of `shuffle_buffer_size` and each block is yielded in a random order
    (seeded by seed, epoch, worker and block). The state (`state_dict`) is the stream's own state
    at the start of the current block plus the position in it, so a resumed iteration re-reads at
    most one block of undecoded rows and then yields exactly the samples an uninterrupted one
    would have; each sample's augmentation is seeded by the same numbers, so it is reproduced too.
    A buffer of datasets' `shuffle` would instead lose its content on resume.

    A read of the stream that fails with a transient error (`is_transient_stream_error`: a
    connection reset, a timeout, HTTP 429 / 5xx) is retried the same way: the stream is re-opened
    at the state of the start of the block being read and the block is read again, so the samples
    are those of an uninterrupted run. Before retry k (1, 2, ...) it waits
    `min(retry_delay * 2 ** (k - 1), max_retry_delay)` seconds and logs a warning; after
    `max_retries` failed retries of one block in a row it raises `StreamReadError` from the last
    failure. Other errors propagate at once. (`datasets` already retries single reads of remote
    files; these retries also cover opening a shard and failures after its own retries gave up.)

    Each sample is `{"crops": [2 + N tensors], "id": str, "skipped": Counter, "stream_retries": int}`,
    where `skipped` counts the rows skipped and `stream_retries` the retried stream reads since the
    previous sample of this worker (the last sample also carries the trailing ones), so that counts
    from every worker reach the main process with the batches. Use a different `seed` in each process.
    """

    def __init__(
        self,
        stream: IterableDataset,
        image_column: str,
        transform,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        id_column: Optional[str] = None,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        min_side: int = 1,
        max_retries: int = 5,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
    ):
        if max_retries < 0 or retry_delay < 0 or max_retry_delay < 0:
            raise ValueError(
                f"max_retries, retry_delay and max_retry_delay must be >= 0, got {max_retries}, {retry_delay}, "
                f"{max_retry_delay}; max_retries=0 turns the retries off"
            )
        self.stream = stream
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.block_size = max(1, shuffle_buffer_size)
        self.id_column = id_column
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.epoch = 0
        self._resume_from = None
        self._state = self._cursor_state(None, 0, 0)

    def set_epoch(self, epoch: int) -> None:
        """A new epoch re-shuffles the stream's shards and the blocks."""
        self.epoch = epoch

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self._resume_from = dict(state_dict)
        self._state = dict(state_dict)

    def _cursor_state(self, anchor, block: int, position: int, exhausted: bool = False) -> dict:
        return {"epoch": self.epoch, "anchor": anchor, "block": block, "position": position, "exhausted": exhausted}

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        previous = None
        for cursor, row, image, counts in self._decoded_rows(worker_id):
            if previous is not None:
                if image is None:  # trailing skips and retries: report them with the last sample
                    previous[3][0].update(counts[0])
                    previous[3][1] += counts[1]
                    break
                self._state = self._cursor_state(*cursor)
                yield self._sample(worker_id, *previous)
            previous = (cursor, row, image, counts)
        if previous is not None and previous[2] is not None:
            self._state = self._cursor_state(*previous[0][:2], previous[0][2] + 1, exhausted=True)
            yield self._sample(worker_id, *previous)

    def _decoded_rows(self, worker_id: int):
        """Yields `((anchor, block, position), row, image, [skipped, retries])` per decodable row,
        then `(None, None, None, [skipped, retries])` if rows were skipped or reads retried after
        the last one."""
        resume, self._resume_from = self._resume_from, None
        if resume is not None and resume["epoch"] == self.epoch:
            if resume["exhausted"]:
                return
            anchor, block, start = resume["anchor"], resume["block"], resume["position"]
        else:
            anchor, block, start = None, 0, 0
        self.stream.set_epoch(self.epoch)
        rows = None  # opened by _read_block at `anchor`; None starts the epoch from its beginning
        counts = [Counter(), 0]
        while True:
            rows, buffer, retries = self._read_block(rows, anchor, block)
            counts[1] += retries
            if not buffer:
                break
            order = np.random.default_rng([self.seed, self.epoch, worker_id, block]).permutation(len(buffer))
            for position in range(start, len(buffer)):
                row = buffer[order[position]]
                image = decode_image(row[self.image_column], counts[0], self.max_pixels, self.min_side)
                if image is not None:
                    yield (anchor, block, position), row, image, counts
                    counts = [Counter(), 0]
            anchor, block, start = self.stream.state_dict(), block + 1, 0
        if counts[0] or counts[1]:
            yield None, None, None, counts

    def _read_block(self, rows, anchor, block: int) -> tuple:
        """Reads the next `block_size` rows from the iterator `rows` (None: open the stream at
        `anchor`), re-opening at `anchor` after a transient failure. Returns `(rows, block's rows,
        number of retries)`."""
        failures = 0
        while True:
            try:
                if rows is None:
                    self.stream.load_state_dict(anchor)
                    rows = iter(self.stream)
                return rows, list(islice(rows, self.block_size)), failures
            except Exception as error:
                if not is_transient_stream_error(error):
                    raise
                failures += 1
                where = f"epoch {self.epoch}, block {block} of {self.block_size} rows"
                if failures > self.max_retries:
                    raise StreamReadError(
                        f"reading the stream {_describe_stream(self.stream)} failed after {failures} "
                        f"attempt{'s' if failures > 1 else ''} in a row ({self.max_retries} retries) at {where}, last with "
                        f"{type(error).__name__}: {error}; check the connection to the source, or allow more retries "
                        f"(max_retries, retry_delay)"
                    ) from error
                delay = min(self.retry_delay * 2 ** (failures - 1), self.max_retry_delay)
                logger.warning(
                    f"reading the stream {_describe_stream(self.stream)} failed at {where} with "
                    f"{type(error).__name__}: {error}; retry {failures} of {self.max_retries} in {delay:g} s"
                )
                time.sleep(delay)
                rows = None

    def _sample(self, worker_id: int, cursor: tuple, row: dict, image: Image.Image, counts: list) -> dict:
        _, block, position = cursor
        key = np.random.SeedSequence([self.seed, self.epoch, worker_id, block, position]).generate_state(2)
        generator = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        sample_id = self._sample_id(row, worker_id, block, position)
        return {"crops": self.transform(image, generator), "id": sample_id, "skipped": counts[0], "stream_retries": counts[1]}

    def _sample_id(self, row: dict, worker_id: int, block: int, position: int) -> str:
        if self.id_column is not None:
            return str(row[self.id_column])
        value = row[self.image_column]
        if isinstance(value, dict) and value.get("path"):
            return value["path"]
        if "__key__" in row:
            return f"{row.get('__url__', '')}::{row['__key__']}"
        return f"worker{worker_id}/block{block}/{position}"


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
    `batch["stream_retries"]`.
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
    )
