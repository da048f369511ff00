"""Streaming image sources for DINO pretraining, and the resumable multi-crop loader.

`load_image_stream` turns a source (a Hub dataset id, a local folder of images, parquet / arrow
files, webdataset `.tar` shards) into a `datasets.IterableDataset` whose image column is left
undecoded, split across processes with `split_dataset_by_node`; `decode_image`
(`dino_hf.data.decoding`) decodes it later, skipping bad images. `build_multicrop_dataloader` wraps the
stream in `MultiCropStream` (`dino_hf.data.stream`: shuffle blocks, decoding, multi-crop,
retried reads) and a torchdata `StatefulDataLoader`, so that the stream position is part of the
training state; `SkipReport` adds up the skipped images that the batches report.
"""

import logging
import math
import os
import tarfile
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Features, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
_TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
_MAX_FILES_PER_SHARD = 1024
_MIN_SHARDS = 256


def load_image_stream(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    train_dir: str | None = None,
    data_files: str | Sequence[str] | None = None,
    image_column_name: str | None = None,
    streaming: bool = True,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    token: str | bool | None = None,
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
    given = [
        name
        for name, value in (("dataset_name", dataset_name), ("train_dir", train_dir), ("data_files", data_files))
        if value
    ]
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


def find_image_column(stream: IterableDataset, image_column_name: str | None = None) -> str:
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


def _expand_data_files(data_files: str | Sequence[str]) -> list:
    import glob

    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.fspath(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"data_files: nothing matches {pattern!r}")
        files += [m for m in matches if os.path.isfile(m)]
    return files


def count_rows(train_dir: str | None = None, data_files: str | Sequence[str] | None = None) -> int | None:
    """The number of samples of a local source, read from the files' headers without decoding:
    parquet row counts from their metadata, arrow record batches, the samples of webdataset `.tar`
    shards (their distinct keys), one per image file. None for a source that is not local."""
    try:
        files = _list_files(train_dir) if train_dir else _expand_data_files(data_files or [])
    except FileNotFoundError:
        return None
    if not files:
        return None
    by_extension = Counter(os.path.splitext(f)[1].lower() for f in files)
    for extension in _TABLE_BUILDERS:  # a table format, when present, is what the stream reads
        if by_extension[extension]:
            return sum(_rows_in_table(f, extension) for f in files if f.lower().endswith(extension))
    return sum(1 for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)


def _rows_in_table(path: str, extension: str) -> int:
    if extension == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if extension == ".arrow":
        with pa.memory_map(path) as source:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    with tarfile.open(path) as shard:  # webdataset: one sample per key, each file of it one field
        return len({_sample_key(member.name) for member in shard if member.isfile()})


def _sample_key(name: str) -> str:
    """webdataset's key of a member: its path up to the first dot of the file name."""
    folder, _, file_name = name.rpartition("/")
    return f"{folder}/{file_name.split('.')[0]}"


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
            yield (
                {"image": {"path": path, "bytes": None}, "label": label}
                if labelled
                else {"image": {"path": path, "bytes": None}}
            )
