"""The data settings of a run (its training images and how they are read), and their checks."""

import glob
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


# The fields that name training data; any of them replaces the demo dataset that a config file asks for.
DATA_SOURCE_FIELDS = ("dataset_name", "train_dir", "data_files")


@dataclass
class DataArguments:
    """The training images: a Hub dataset, a folder, data files, or the demo dataset."""

    demo: bool = field(
        default=False,
        metadata={
            "help": "Train on the procedurally generated demo dataset (made on first use). In a config file it "
            "gives way to --dataset_name, --train_dir or --data_files."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or a local dataset script/folder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (flat or class sub-folders)."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Parquet / arrow files or webdataset .tar shards (local paths or hf:// URLs)."}
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    shuffle_buffer_size: int = field(default=10000, metadata={"help": "Shuffle buffer of the stream."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per process."})
    max_image_pixels: int | None = field(
        default=None, metadata={"help": "Decompression-bomb limit in pixels (default: PIL's)."}
    )


def check_data(args: "DinoTrainingArguments") -> None:
    """One source of training images, that exists; the loader's sizes."""
    check_ranges(
        args,
        positive=("shuffle_buffer_size",),
        non_negative=("dataloader_num_workers",),
        positive_or_unset=("max_image_pixels",),
    )
    sources = [name for name in DATA_SOURCE_FIELDS if getattr(args, name)]
    if args.demo and sources:
        fail("demo", True, f"train on the demo dataset or on --{sources[0]}, not both")
    if not args.demo and not sources:
        raise ValueError(
            "no training data: pass --dataset_name (a Hub id), --train_dir (a folder of images) or --data_files "
            "(parquet / webdataset shards), or --demo to train on the generated demo dataset"
        )
    if len(sources) > 1:
        fail(sources[1], getattr(args, sources[1]), f"leave it unset when --{sources[0]} is given (one source)")
    if args.train_dir and not os.path.isdir(args.train_dir):
        fail("train_dir", args.train_dir, "an existing folder of images")
    for pattern in args.data_files or []:
        if "://" not in pattern and not glob.glob(pattern, recursive=True):
            fail("data_files", pattern, "paths or globs that match existing files (or hf:// URLs)")
    if args.dataset_name:
        _refuse_saved_dataset(args.dataset_name, args.train_split)


def _refuse_saved_dataset(name: str, split: str) -> None:
    """A folder of `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`) does not stream; its arrow files do."""
    if os.path.isfile(os.path.join(name, "state.json")):
        files = os.path.join(name, "*.arrow")
    elif os.path.isfile(os.path.join(name, "dataset_dict.json")):
        files = os.path.join(name, split, "*.arrow")
    else:
        return
    fail(
        "dataset_name",
        name,
        f"a Hub dataset id or a folder of data files; this folder was written by save_to_disk: pass its arrow "
        f"files as --data_files '{files}'",
    )


__all__ = ["DATA_SOURCE_FIELDS", "DataArguments", "check_data"]
