"""Dense benchmark: what iBOT's masked-patch loss and Gram anchoring add to DINO, at the same budget, on a
global task (k-NN) and a dense one (linear segmentation). Offline, on the CPU.

The data is the generated shapes segmentation set (`dino_hf.data.segmentation.make_segmentation_set`: one of
10 shapes on a cluttered background per 64 px image, 100 training and 30 validation images per shape, masks
with class 0 for the background and k + 1 for shape k). Pretraining sees the training images without labels.

Two starts, each trained for the same steps under three recipes that differ only by the losses:

- `scratch`: `configs/small_data_vit.yaml`'s 6-block ViT-Ti/8 (a DinoModel) from random init:
  (1) DINO alone (the config), (2) + iBOT (`--ibot_loss_weight 1`), (3) + iBOT + Gram anchoring to an EMA
  Gram teacher (DINOv3's: a snapshot of the EMA teacher at half the steps, refreshed at three quarters).
- `released`: the continued-pretraining benchmark's released Dinov2Model ViT (4 blocks, width 192, patch 8,
  trained with the labels of the textures set; `benchmarks/continued_pretraining.py`), continued with
  `configs/continue_pretraining_ibot.yaml`, its step counts scaled to the budget: (1) without iBOT and
  without Gram, (2) without Gram, (3) the config: iBOT + Gram anchoring to the start.

Each start also gets a row for its untrained weights (random init, or the released checkpoint). The table
gives, for every teacher backbone at the end: the weighted k-NN top-1 (k = 20) of the validation images by
shape; the mIoU and pixel accuracy over the 11 classes of `scripts/eval_dense.py`'s linear probe (BatchNorm +
1 x 1 conv on the frozen patch tokens, trained on cached features of the training split, scored on the
validation split); and the foreground IoU of the same probe trained to tell any shape from the background
(the set's masks with the shapes merged into one class), which asks where the object is and not which one;
and, without any probe, the IoU of the paper's attention masks (the patches holding 60 % of the last
block's CLS attention, heads averaged) with the shape (`dino_hf.evaluation.attention.attention_foreground_iou`).
A probe that marks every pixel as background scores the floor: mIoU 7.6 (the background's IoU, 83 %,
over 11 classes) and a foreground IoU of 0.

    python benchmarks/dense.py
    python benchmarks/dense.py --starts scratch --max_steps 60

Flags it does not know go to every run's training arguments, after its own, so they override them (e.g.
`--learning_rate`). Run it with `OMP_NUM_THREADS=1` on a shared machine.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from continued_pretraining import cpu_budget, make_release
from PIL import Image
from small_data import IMAGE_SIZE, METRIC, hardware, make_set

from dino_hf import DinoConfig, DinoModel
from dino_hf.data.demo import default_demo_root
from dino_hf.data.segmentation import IGNORE_INDEX, SHAPES, make_segmentation_set, segmentation_folder
from dino_hf.evaluation.attention import attention_foreground_iou
from dino_hf.evaluation.dense import SegmentationBatches, segmentation_transform
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.models.backbones import build_backbone
from dino_hf.training.arguments import parse_training_args
from dino_hf.training.trainer import backbone_knn, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from eval_dense import main as eval_dense  # noqa: E402

NUM_CLASSES = 1 + len(SHAPES)  # the background and the 10 shapes
TRANSFORM = segmentation_transform(IMAGE_SIZE)

STARTS = {
    "scratch": "ViT-Ti/8, 6 blocks (DinoModel), random init",
    "released": "released Dinov2Model ViT (4 blocks, width 192, patch 8)",
}
# What every run shares: the data's size and the budget of configs/small_data_vit.yaml.
BUDGET = cpu_budget(local_crops_number=4, logging_steps=25)
IBOT = ["--ibot_loss_weight", "1.0"]


def recipes(start: str, steps: int) -> dict[str, list[str]]:
    """The three recipes of `start` for a run of `steps` steps: DINO alone, + iBOT, + iBOT + Gram."""
    if start == "scratch":
        base = ["--config", "configs/small_data_vit.yaml"]
        gram = ["--gram_loss_weight", "1.0", "--gram_teacher", "ema", "--gram_start_step", str(steps // 2)]
        gram += ["--gram_update_steps", str(steps // 4), "--gram_max_updates", "1"]
        return {"(1) DINO": base, "(2) DINO + iBOT": base + IBOT, "(3) DINO + iBOT + Gram (EMA)": base + IBOT + gram}
    # The config's warm-ups scaled from its 1000 steps to the benchmark's, as benchmarks/continued_pretraining.py.
    warmups = [str(max(1, steps // 7))] * 2
    base = ["--config", "configs/continue_pretraining_ibot.yaml", "--head_warmup_steps", warmups[0]]
    base += ["--backbone_warmup_steps", warmups[1], "--learning_rate", "0.002", "--momentum_teacher", "0.99"]
    return {
        "(1) DINO": base + ["--ibot_loss_weight", "0", "--gram_loss_weight", "0"],
        "(2) DINO + iBOT": base + ["--gram_loss_weight", "0"],
        "(3) DINO + iBOT + Gram (start)": base,
    }


def start_folder(start: str, root: Path) -> Path:
    """The untrained weights of `start` as a folder: the released checkpoint, or a DinoModel of the scratch
    runs' architecture at random init (seed 0; the runs draw their own init from the config's preset)."""
    if start == "released":
        return make_release("vit", make_set("textures", root), root / "released")
    folder = root / "dense" / "vit_tiny_patch8_6blocks_seed0"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        DinoModel(DinoConfig.from_preset("vit_tiny_patch8", num_hidden_layers=6)).save_pretrained(folder)
    return folder


def start_flags(start: str, folder: Path) -> list[str]:
    """The model flags of a run from `start`: the scratch runs keep their config's preset."""
    return [] if start == "scratch" else ["--model_name_or_path", str(folder)]


def foreground_set(segmentation: Path) -> Path:
    """The segmentation set with one foreground class: the same images (linked), masks 0 for the
    background and 1 for any shape (made once, beside the set)."""
    folder = segmentation.with_name(segmentation.name + "_foreground")
    if (folder / "done").is_file():
        return folder
    for split in ("train", "validation"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        images = folder / split / "images"
        if not images.exists():
            images.symlink_to((segmentation / split / "images").resolve(), target_is_directory=True)
        for mask in (segmentation / split / "masks").glob("*/*.png"):
            target = folder / split / "masks" / mask.parent.name / mask.name
            target.parent.mkdir(parents=True, exist_ok=True)
            classes = np.asarray(Image.open(mask))
            Image.fromarray(np.where(classes == IGNORE_INDEX, IGNORE_INDEX, classes > 0).astype(np.uint8)).save(target)
    (folder / "done").write_text("")
    return folder


def probe(folder: Path, segmentation: Path, probe_epochs: int, num_labels: int) -> dict:
    """scripts/eval_dense.py's linear probe on the frozen patch tokens of the backbone in `folder`."""
    return eval_dense(
        ["--model", str(folder), "--image_size", str(IMAGE_SIZE), "--cache_features", "--num_workers", "1"]
        + ["--train_dir", str(segmentation / "train"), "--eval_dir", str(segmentation / "validation")]
        + ["--epochs", str(probe_epochs), "--num_labels", str(num_labels)]
    )


def measure(folder: Path, segmentation: Path, probe_epochs: int) -> dict:
    """Of the backbone saved in `folder`: the k-NN top-1 (%) at k = 20 of the validation images by shape;
    the linear probe's mIoU and pixel accuracy over the 11 classes; the IoU of the foreground class of a
    probe trained to tell any shape from the background; and the IoU of the attention masks with the
    shapes (`attention_foreground_iou`), which needs no probe."""
    images = {split: str(segmentation / split / "images") for split in ("train", "validation")}
    args = parse_training_args(["--train_dir", images["train"], "--global_crops_size", str(IMAGE_SIZE)])
    backbone = build_backbone(str(folder), drop_path_rate=0.0)
    sources = ({"train_dir": images["train"]}, {"train_dir": images["validation"]})
    knn = backbone_knn(backbone, args, sources)[METRIC]
    model, _ = load_feature_model(str(folder), IMAGE_SIZE)
    pairs = segmentation_folder(segmentation / "validation")
    attention = attention_foreground_iou(model, SegmentationBatches(pairs, "image", "mask", TRANSFORM, 50))
    classes = probe(folder, segmentation, probe_epochs, NUM_CLASSES)
    foreground = probe(folder, foreground_set(segmentation), probe_epochs, 2)
    return {
        "k-NN": knn,
        "mIoU": classes["miou"],
        "pixel acc.": classes["pixel_accuracy"],
        "foreground IoU": foreground["iou_per_class"][1] or 0.0,
        "attention IoU": attention,
    }


def run(flags: list[str], segmentation: Path, output_dir: Path, extra: list[str]) -> tuple[Path, dict]:
    """One pretraining run: its export, and its steps and minutes."""
    images = segmentation / "train" / "images"
    samples = sum(1 for _ in images.glob("*/*.png"))
    args = parse_training_args(
        flags
        + BUDGET
        + ["--train_dir", str(images), "--samples_per_epoch", str(samples)]
        + ["--output_dir", str(output_dir)]
        + extra
    )
    began = time.perf_counter()
    result = train(args)
    return result.export_dir, {"steps": result.global_step, "minutes": (time.perf_counter() - began) / 60}


COLUMNS = ["k-NN", "mIoU", "pixel acc.", "foreground IoU", "attention IoU", "steps", "minutes"]


def table(rows: list[dict]) -> str:
    lines = ["| start | recipe | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for row in rows:
        cells = [row.get(column) for column in COLUMNS]
        text = ["-" if c is None else f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells]
        lines.append(f"| {row['start']} | {row['recipe']} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", default="scratch,released", help=f"comma-separated: {', '.join(STARTS)}")
    parser.add_argument("--max_steps", type=int, default=120, help="steps of each pretraining run")
    parser.add_argument("--probe_epochs", type=int, default=10, help="epochs of the linear segmentation probe")
    parser.add_argument("--root", default=os.path.join(default_demo_root(), "small_data"), help="where sets are made")
    parser.add_argument("--output_dir", default="outputs/dense", help="one folder per run")
    args, extra = parser.parse_known_args()
    extra = ["--max_steps", str(args.max_steps), *extra]
    print(f"# dense benchmark: {' '.join(extra)}")
    print(hardware())
    began = time.perf_counter()
    segmentation = make_segmentation_set(image_size=IMAGE_SIZE)
    rows = []
    for start in [name.strip() for name in args.starts.split(",") if name.strip()]:
        folder = start_folder(start, Path(args.root))
        rows.append({"start": start, "recipe": "(0) untrained", **measure(folder, segmentation, args.probe_epochs)})
        print(table(rows[-1:]))
        for recipe, flags in recipes(start, args.max_steps).items():
            flags = flags + start_flags(start, folder)
            export, cost = run(flags, segmentation, Path(args.output_dir) / f"{start}_{len(rows)}", extra)
            rows.append({"start": start, "recipe": recipe, **measure(export, segmentation, args.probe_epochs), **cost})
            print(table(rows[-1:]))
    print("\nOn the validation split of the shapes segmentation set: k-NN top-1 (%) at k = 20; the linear probe's")
    print(
        "mIoU and pixel accuracy (%) over the 11 classes; the foreground IoU (%) of a probe for shape vs background;"
    )
    print("the IoU (%) of the 60 % attention masks with the shapes")
    print(f"{', '.join(f'{key}: {text}' for key, text in STARTS.items())}")
    print(f"{hardware()}; {(time.perf_counter() - began) / 60:.1f} min in all\n")
    print(table(rows))


if __name__ == "__main__":
    main()
