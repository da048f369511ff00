"""The command-line options the evaluation scripts share: the model, its image size and the labelled
data of the train and eval splits (class labels, or segmentation masks); and what the probe scripts
(scripts/eval_linear.py, scripts/eval_dense.py) share: their training run's options, the train rows
of an epoch and the files they write."""

import json
import os

import datasets
import torch

from ..data import segmentation
from ..data.segmentation import segmentation_folder, segmentation_rows
from ..data.sources import load_image_stream
from .features import find_label_column


def default_num_workers() -> int:
    """DataLoader workers the evaluation scripts start unless told: 4, fewer on a machine with fewer CPU
    cores than 5, one core left to the main process (torch warns at each loader that has more workers than
    the cores this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def add_model_argument(parser, image_size_help: str = "Centre-crop size (resize to size * 256 / 224).") -> None:
    """The `--model` and `--image_size` options of the evaluation scripts (`--model`: anything
    `load_feature_model` reads; `--image_size`: the model's own size when not given)."""
    parser.add_argument(
        "--model",
        required=True,
        help="DinoModel folder or Hub id, transformers ViT folder, timm:NAME or timm folder, "
        "or a training checkpoint (its teacher).",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help=f"{image_size_help} Default: the model's own, i.e. the crop size of its saved image "
        "processor, timm's pretrained_cfg or the training resolution of its checkpoint; 224 "
        "when the model names none.",
    )


def image_size_line(model) -> str:
    """The line the evaluation scripts print to say at which size, and with which mean and std, they
    evaluate `model` (a `FeatureModel` of `load_feature_model`)."""
    mean, std = (", ".join(f"{value:g}" for value in values) for values in model.normalization)
    return (
        f"image size: {model.image_size} px ({model.image_size_source}); "
        f"normalised with mean ({mean}), std ({std}) ({model.normalization_source})"
    )


def add_dataset_arguments(parser, labelled: bool = True) -> None:
    """Command-line options that name the data of an evaluation script (train and eval splits)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", help="Hub dataset id or a local dataset folder.")
    group.add_argument("--dataset_config_name", help="Configuration of the dataset.")
    group.add_argument("--train_dir", help="Image folder (class sub-folders give the labels) for the train split.")
    group.add_argument(
        "--train_files", nargs="+", help="Data files (parquet, arrow, webdataset .tar) of the train split."
    )
    group.add_argument("--train_split", default="train", help="Split of --dataset_name used as the train set.")
    group.add_argument("--image_column_name", help="Image column (found automatically).")
    group.add_argument(
        "--no_streaming", dest="streaming", action="store_false", help="Download the dataset instead of streaming it."
    )
    if labelled:
        group.add_argument("--eval_dir", help="Image folder (class sub-folders) for the eval split.")
        group.add_argument("--eval_files", nargs="+", help="Data files of the eval split.")
        group.add_argument("--eval_split", default="validation", help="Split of --dataset_name used as the eval set.")
        group.add_argument(
            "--label_column_name", help="Label column (found automatically: label, labels, class, target)."
        )


def load_split(args, which: str = "train") -> tuple[object, str, str | None]:
    """`(rows, image_column, label_column)` of the `which` ("train" or "eval") split named by the options
    of `add_dataset_arguments`; label_column is None for unlabelled parsers."""
    folder, files = getattr(args, f"{which}_dir", None), getattr(args, f"{which}_files", None)
    if folder or files:
        source = dict(train_dir=folder, data_files=files)
    else:
        split = getattr(args, f"{which}_split")
        source = dict(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, split=split)
    if not any(source.values()):
        raise ValueError(f"no data for the {which} split: pass --dataset_name, --{which}_dir or --{which}_files")
    rows, image_column = load_image_stream(
        image_column_name=args.image_column_name, streaming=args.streaming, **source
    )
    if not hasattr(args, "label_column_name"):
        return rows, image_column, None
    return rows, image_column, find_label_column(rows, args.label_column_name)


def add_segmentation_arguments(parser) -> None:
    """Command-line options that name the image / mask pairs of a dense evaluation (train and eval splits)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--demo",
        action="store_true",
        help="The generated shapes segmentation set (10 shapes on clutter, 64 px, 1,000 train and 300 validation "
        "images; made offline on first use, then reused) as both splits.",
    )
    group.add_argument("--dataset_name", help="Hub dataset id or a local dataset folder (an image and a mask column).")
    group.add_argument("--dataset_config_name", help="Configuration of the dataset.")
    group.add_argument("--train_split", default="train", help="Split of --dataset_name used as the train set.")
    group.add_argument("--eval_split", default="validation", help="Split of --dataset_name used as the eval set.")
    for which in ("train", "eval"):
        group.add_argument(
            f"--{which}_dir", help=f"Folder of the {which} split: images/ and masks/<same relative path>.png."
        )
        group.add_argument(f"--{which}_files", nargs="+", help=f"Parquet or arrow files of the {which} split.")
    group.add_argument("--image_column_name", help="Image column (found automatically).")
    group.add_argument(
        "--mask_column_name", help="Mask column (found automatically: the single-channel image column)."
    )
    group.add_argument(
        "--no_streaming", dest="streaming", action="store_false", help="Download the dataset instead of streaming it."
    )


def load_segmentation_split(args, which: str = "train") -> tuple[object, str, str]:
    """`(rows, image_column, mask_column)` of the `which` ("train" or "eval") split named by the options
    of `add_segmentation_arguments` (see `dino_hf.data.segmentation.segmentation_rows`)."""
    folder, files = getattr(args, f"{which}_dir"), getattr(args, f"{which}_files")
    if getattr(args, "demo", False):
        given = [option for option in ("dataset_name", f"{which}_dir", f"{which}_files") if getattr(args, option)]
        if given:
            raise ValueError(f"--demo evaluates on the generated set; leave out --{given[0]}, or --demo")
        folder = segmentation.make_segmentation_set() / ("train" if which == "train" else "validation")
        print(f"{which} split: the generated shapes segmentation set, {folder}")
    if folder:
        rows = segmentation_folder(folder)
    elif files or args.dataset_name:
        source = dict(data_files=files) if files else dict(dataset_name=args.dataset_name)
        if not files:
            source |= dict(dataset_config_name=args.dataset_config_name, split=getattr(args, f"{which}_split"))
        rows, _ = load_image_stream(image_column_name=args.image_column_name, streaming=args.streaming, **source)
    else:
        raise ValueError(f"no data for the {which} split: pass --dataset_name, --{which}_dir or --{which}_files")
    return segmentation_rows(rows, args.image_column_name, args.mask_column_name)


def add_probe_run_arguments(parser, cache_features_help: str, num_workers_help: str | None = None) -> None:
    """The last options of the probe scripts: `--cache_features`, `--num_workers`, `--seed`,
    `--shuffle_buffer_size` (both read by `epoch_rows`) and `--output_dir` (see `save_probe`)."""
    parser.add_argument("--cache_features", action="store_true", help=cache_features_help)
    parser.add_argument("--num_workers", type=int, default=default_num_workers(), help=num_workers_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shuffle_buffer_size", type=int, default=10000, help="Shuffle buffer of a streamed train set."
    )
    parser.add_argument("--output_dir", help="Write the probe weights and the metrics here.")


def epoch_rows(rows, args, epoch: int):
    """The train rows of `epoch`, shuffled with seed `args.seed + epoch`: exactly for an in-memory
    dataset, within a buffer of `args.shuffle_buffer_size` rows for a streamed one."""
    buffer = {"buffer_size": args.shuffle_buffer_size} if isinstance(rows, datasets.IterableDataset) else {}
    return rows.shuffle(seed=args.seed + epoch, **buffer)


def save_probe(output_dir: str, probe: torch.nn.Module, file_name: str, metrics: dict) -> None:
    """Write the probe's weights (`output_dir/file_name`, a `torch.save`d state dict) and `metrics.json`."""
    os.makedirs(output_dir, exist_ok=True)
    torch.save(probe.state_dict(), os.path.join(output_dir, file_name))
    with open(os.path.join(output_dir, "metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)


__all__ = [
    "add_dataset_arguments",
    "add_model_argument",
    "add_probe_run_arguments",
    "add_segmentation_arguments",
    "default_num_workers",
    "epoch_rows",
    "image_size_line",
    "load_segmentation_split",
    "load_split",
    "save_probe",
]
