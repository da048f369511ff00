"""The data a training run reads: its training images and the labelled splits of its k-NN evaluation.

They come from the training arguments: a Hub dataset, a local folder or data files, or (`demo: true`)
the generated demo dataset, made on first use. `dataset_size` is the number of images where it is
known without reading the stream; an epoch has that many samples unless `--samples_per_epoch` says.
"""

from pathlib import Path

from ..data.demo import default_demo_root, make_demo_dataset
from ..data.sources import count_rows
from .arguments import DinoTrainingArguments


def demo_root() -> Path:
    """The generated demo dataset (made on first use)."""
    return Path(make_demo_dataset(default_demo_root()))


def train_source(args: DinoTrainingArguments) -> dict:
    """Where the run's training images come from, as `load_image_stream` arguments."""
    if args.demo:
        return {"train_dir": str(demo_root() / "train")}
    return {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "split": args.train_split,
        "train_dir": args.train_dir,
        "data_files": args.data_files,
    }


def describe_source(source: dict, demo: bool = False) -> str:
    """One line naming the training data of `source` (a `train_source` result), for the run's log."""
    if demo:
        return f"the generated demo dataset in {source['train_dir']}"
    if source.get("dataset_name"):
        config = f" ({source['dataset_config_name']})" if source.get("dataset_config_name") else ""
        return f"dataset {source['dataset_name']}{config}, split {source.get('split', 'train')}"
    if source.get("train_dir"):
        return f"the images under {source['train_dir']}"
    files = source["data_files"]
    return f"data files {', '.join(files) if isinstance(files, list | tuple) else files}"


def dataset_size(stream, source: dict) -> int | None:
    """Rows of the training data where it can be known without reading it."""
    splits = getattr(getattr(stream, "info", None), "splits", None) or {}
    split = source.get("split", "train")
    if split in splits and splits[split].num_examples:
        return splits[split].num_examples
    if source.get("train_dir") or source.get("data_files"):
        return count_rows(source.get("train_dir"), source.get("data_files"))
    return None


def knn_sources(args: DinoTrainingArguments) -> tuple[dict, dict] | None:
    """Memory-bank and query sources of the in-training k-NN, or None when none is configured."""
    if args.eval_train_dir:
        root = Path(args.eval_train_dir)
        return {"train_dir": str(root / args.eval_train_split)}, {"train_dir": str(root / args.eval_split)}
    if args.eval_dataset_name:
        common = {"dataset_name": args.eval_dataset_name, "dataset_config_name": args.eval_dataset_config_name}
        return {**common, "split": args.eval_train_split}, {**common, "split": args.eval_split}
    if args.demo:
        root = demo_root()
        return {"train_dir": str(root / "train")}, {"train_dir": str(root / "validation")}
    return None
