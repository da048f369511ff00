"""Small-data benchmark: a DINO recipe judged on labelled image sets it was not tuned on.

Recipes are chosen on one set (the demo's shapes, `dino_hf.data.demo`) and reported on the others,
so that a recipe that only fits the demo shows it. Three sets of other kinds are generated here,
deterministically and offline, as 64 px PNGs in imagefolder layout
`<root>/<set>/{train,validation}/<class>/<index>.png`:

- `shapes`: 10 shapes (circle, triangle, square, star, plus, arrow, heart, crescent, spiral,
  zigzag), outlined or filled, in a random colour, position, scale and rotation, over a blotchy
  colour background with thin clutter strokes; a little smaller in the frame than the demo's objects.
  They are drawn by `dino_hf.data.segmentation`, which also makes them a segmentation set.
- `textures`: 10 procedural textures filling the frame (stripes, waves, zigzag, checker, dots, grid,
  rings, sunburst, blobs, bricks) in two random colours, at a random angle, period and phase.
- `digits`: the 10 digits in Pillow's bundled font (`ImageFont.load_default(size=...)`) at a random
  size, stroke, rotation, position and colour, over the same cluttered background as `shapes`.

How far a good representation can go: raw pixels and a random-init ResNet-10-T stay near chance on
`shapes` and `digits` (on `textures` random features reach about 22 %), while the same network trained
with the labels on the same 1,000 images reaches a k-NN top-1 of about 63 % (shapes, 40 epochs), 52 %
(digits, 40 epochs) and 71 % (textures, 15 epochs); on the demo set, 97 % after 15 epochs.
`--label_epochs N` measures that reference beside each recipe (the `labels` column, see
`label_reference`): with N = 12, the epochs of the small-data recipes, it is 34 / 61 / 22 % for the
ResNet-10-T and 9 / 44 / 10 % for their 6-block ViT-Ti/8 on shapes / textures / digits.

`--sets demo` adds the demo dataset itself. For each set the recipe (`--config`, the demo's by
default) is trained on `<set>/train` with `dino_hf.training.train`, and the table reports the
weighted k-NN top-1 at k = 20 on `<set>/validation` (memory bank `<set>/train`) of: chance, the raw
pixels (64 px, centred by the training mean; `knn_evaluate` normalises them), the random-init
teacher and the trained teacher (the trainer's own in-training k-NN), the gain of training, and
the minutes the training took (both k-NN evaluations included).

    python benchmarks/small_data.py --config configs/demo.yaml
    python benchmarks/small_data.py --config configs/demo.yaml --sets textures --num_train_epochs 4
    python benchmarks/small_data.py --config configs/small_data.yaml --label_epochs 12

Flags the benchmark does not know go to `parse_training_args` after the ones it sets, so they
override them. Run it with `OMP_NUM_THREADS=1` on a shared machine; the sets are trained one after
the other, and `--max_minutes` stops starting new ones once the benchmark has run that long.
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.transforms import v2

from dino_hf.data.demo import default_demo_root, make_demo_dataset
from dino_hf.data.segmentation import (
    SHAPES,
    blotchy,
    cluttered_background,
    draw_shape,
    mean_colour,
    paint,
    random_colour,
)
from dino_hf.evaluation.knn import knn_evaluate
from dino_hf.models.image_processing_dino import IMAGENET_MEAN, IMAGENET_STD
from dino_hf.models.transformers_backbone import FAMILIES, TransformersBackbone
from dino_hf.training.arguments import DinoTrainingArguments, parse_training_args
from dino_hf.training.networks import build_student_teacher
from dino_hf.training.run_sources import knn_sources
from dino_hf.training.trainer import backbone_knn, train

IMAGE_SIZE = 64
K = 20  # the k reported, as the demo's README table
METRIC = f"knn_top1@{K}"
# What every distillation benchmark run shares beside the sets' crop size: batch 32, one loader worker, fp32, no
# checkpoint.
DISTILLATION_BUDGET = [
    "--per_device_train_batch_size", "32",
    "--dataloader_num_workers", "1",
    "--shuffle_buffer_size", "1000",
    "--checkpointing_steps", "100000",
    "--mixed_precision", "no",
    "--logging_steps", "31",
]  # fmt: skip
# Bump when a generator changes, so that a dataset made by the old one is not reused.
GENERATOR_VERSION = 2
_MARKER = "dataset_info.json"


# ---- (b) textures: the whole frame, two random colours -----------------------------------------

TEXTURES = ("stripes", "waves", "zigzag", "checker", "dots", "grid", "rings", "sunburst", "blobs", "bricks")


def _triangle_wave(x: np.ndarray) -> np.ndarray:
    return 2 * np.abs(x - np.floor(x + 0.5))  # 0 at integers, 1 at half-integers


def _texture_pattern(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float in [0, 1]: where the second colour goes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, phase = rng.uniform(0, math.pi), rng.uniform(0, 1)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / rng.uniform(6, 14) + phase  # in periods
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / rng.uniform(6, 14) + rng.uniform(0, 1)
    if texture == "stripes":
        return _triangle_wave(u) < rng.uniform(0.35, 0.65)
    if texture == "waves":  # soft, wavy stripes
        return 0.5 + 0.5 * np.sin(2 * np.pi * u + rng.uniform(1, 2.5) * np.sin(2 * np.pi * v / rng.uniform(1.5, 3)))
    if texture == "zigzag":
        return _triangle_wave(u + rng.uniform(0.4, 1) * _triangle_wave(v)) < 0.5
    if texture == "checker":
        return (np.floor(2 * u) + np.floor(2 * v)) % 2
    if texture == "dots":
        return np.hypot(u % 1 - 0.5, v % 1 - 0.5) < rng.uniform(0.18, 0.32)
    if texture == "grid":
        width = rng.uniform(0.12, 0.25)
        return (u % 1 < width) | (v % 1 < width)
    centre = rng.uniform(0.15, 0.85, 2) * size
    if texture == "rings":
        return _triangle_wave(np.hypot(xx - centre[0], yy - centre[1]) / rng.uniform(5, 11) + phase) < 0.5
    if texture == "sunburst":
        theta = np.arctan2(yy - centre[1], xx - centre[0])
        return np.sin(int(rng.integers(5, 12)) * theta + 2 * np.pi * phase) > 0
    if texture == "blobs":
        noise = blotchy(size, int(rng.integers(5, 10)), rng)[..., 0]
        return noise > np.median(noise)
    # bricks: rows of rectangles, every other row shifted by half a brick, with mortar lines
    row = np.floor(v)
    return ((v % 1) < 0.2) | (((u / 2 + 0.5 * (row % 2)) % 1) < 0.1)


def draw_texture(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """The texture of class `class_index` over the whole frame, in two contrasting random colours."""
    pattern = _texture_pattern(TEXTURES[class_index], size, rng).astype(np.float32)[..., None]
    first = random_colour(rng)
    second = random_colour(rng, away_from=first)
    shading = blotchy(size, 2, rng).mean(-1, keepdims=True) / 255 - 0.5  # uneven light, -0.5 .. 0.5
    pixels = (1 - pattern) * first + pattern * second + 40 * shading + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_texture_finer(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """The texture of class `class_index` rendered otherwise than `draw_texture` (a domain shift for its classes):
    twice as fine (drawn at twice the size and averaged), in two shades of one colour, with stronger noise and
    no uneven light."""
    pattern = _texture_pattern(TEXTURES[class_index], 2 * size, rng).astype(np.float32)
    pattern = pattern.reshape(size, 2, size, 2).mean(axis=(1, 3))[..., None]  # (size, size, 1)
    first = random_colour(rng)
    second = np.clip(first * rng.uniform(0.3, 0.6) + rng.uniform(-30, 30, 3), 0, 255)  # a darker shade of it
    pixels = (1 - pattern) * first + pattern * second + rng.normal(0, 18, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ---- (c) digits: Pillow's bundled font, rendered ------------------------------------------------

DIGITS = tuple(str(d) for d in range(10))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same on every machine


def draw_digit(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """The digit `class_index` at a random size, stroke, rotation, position and colour, on clutter."""
    background = cluttered_background(size, rng)
    canvas = Image.new("L", (2 * size, 2 * size), 0)
    stroke = int(rng.integers(0, 3))
    ImageDraw.Draw(canvas).text(
        (size, size),
        DIGITS[class_index],
        fill=255,
        font=_font(int(rng.integers(34, 56))),
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    glyph = canvas.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
    glyph = glyph.crop(glyph.getbbox())
    if max(glyph.size) > size - 4:  # the largest sizes, rotated, may not fit
        scale = (size - 4) / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.BILINEAR)
    mask = Image.new("L", (size, size), 0)
    mask.paste(glyph, (int(rng.integers(0, size - glyph.width + 1)), int(rng.integers(0, size - glyph.height + 1))))
    colour = random_colour(rng, away_from=mean_colour(background, mask))
    return paint(background, mask, colour, noise=8, rng=rng)


# ---- the sets -----------------------------------------------------------------------------------

# name -> (class names, drawing function, training images per class, validation images per class).
# About 1,000 training images each, as the demo's 960, so that one run of the demo recipe takes
# about as long as the demo.
SETS: dict[str, tuple[tuple[str, ...], Callable, int, int]] = {
    "shapes": (SHAPES, draw_shape, 100, 30),
    "textures": (TEXTURES, draw_texture, 100, 30),
    # The textures' classes rendered otherwise: the distillation benchmark's shifted domain.
    "textures_finer": (TEXTURES, draw_texture_finer, 100, 30),
    "digits": (DIGITS, draw_digit, 100, 30),
}


def make_set(name: str, root: str, seed: int = 0) -> Path:
    """Generates (or finds) set `name` under `root` and returns its folder (`train/`, `validation/`).

    Deterministic in `seed`; `dataset_info.json`, written last, marks a finished set, which is reused.
    """
    classes, draw, train_per_class, eval_per_class = SETS[name]
    info = {"version": GENERATOR_VERSION, "train_per_class": train_per_class, "eval_per_class": eval_per_class}
    info |= {"image_size": IMAGE_SIZE, "seed": seed, "classes": list(classes)}
    path = Path(root) / f"{name}_v{GENERATOR_VERSION}_s{IMAGE_SIZE}_seed{seed}"
    try:
        if json.loads((path / _MARKER).read_text()) == info:
            return path
    except (OSError, ValueError):
        pass
    staging = Path(root) / f".{path.name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for split, count, split_seed in (("train", train_per_class, 0), ("validation", eval_per_class, 1)):
        for k, class_name in enumerate(classes):
            folder = staging / split / f"{k:02d}_{class_name}"
            folder.mkdir(parents=True)
            rng = np.random.default_rng([seed, split_seed, k])
            for index in range(count):
                draw(k, IMAGE_SIZE, rng).save(folder / f"{index:05d}.png")
    (staging / _MARKER).write_text(json.dumps(info, indent=2))
    shutil.rmtree(path, ignore_errors=True)  # an older or unfinished one
    staging.rename(path)
    return path


def _load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3 * 64 * 64) in [0, 1] and class ids (N,), classes in sorted folder order like the trainer's."""
    pixels, labels = [], []
    for label, class_folder in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for file in sorted(class_folder.glob("*.png")):
            image = Image.open(file).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
            pixels.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255)
            labels.append(label)
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels)


def pixel_knn(path: Path) -> tuple[float, int]:
    """k-NN top-1 (%) at k = 20 on the raw pixels, centred by the training mean, and the number of classes."""
    train_x, train_y = _load_split(path / "train")
    test_x, test_y = _load_split(path / "validation")
    mean = train_x.mean(0)
    metrics = knn_evaluate(train_x - mean, train_y, test_x - mean, test_y, ks=(K,), device="cpu")
    return metrics[METRIC], int(train_y.max()) + 1


def fit_labels(
    backbone: nn.Module, path: Path, *, epochs: int, crop_size: int, crop_scale: tuple, batch_size: int
) -> nn.Module:
    """Trains `backbone` in place on the classes of `<path>/train` and returns it (random draws from
    torch's global generator, which the caller seeds).

    A linear layer on the backbone's features, cross-entropy, AdamW at 1e-3 with weight decay 0.05 and a
    one-cycle schedule, random resized crops of `crop_size` at `crop_scale` and flips, ImageNet mean and std.
    """
    images, labels = _load_split(path / "train")
    images = images.view(-1, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2)
    backbone.train()
    classifier = nn.Linear(backbone.num_features, int(labels.max()) + 1)
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(crop_size, scale=crop_scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    batch_size = min(batch_size, len(labels))
    steps_per_epoch = len(labels) // batch_size
    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            crops = torch.stack([augment(image) for image in images[batch]])
            loss = F.cross_entropy(classifier(backbone(crops)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return backbone


def make_labelled_dinov2(release: Path, folder: Path, shape: dict, epochs: int) -> Path:
    """A transformers `Dinov2Model` of `shape` trained with the labels of `release` for `epochs` (`fit_labels`),
    saved to `folder`; a folder made before is reused."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**shape, image_size=IMAGE_SIZE)
    backbone = TransformersBackbone(transformers.Dinov2Model(config), FAMILIES["dinov2"])
    fit_labels(backbone, release, epochs=epochs, crop_size=IMAGE_SIZE, crop_scale=(0.4, 1.0), batch_size=32)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    backbone.model.save_pretrained(staging)
    staging.rename(folder)
    return folder


def label_reference(path: Path, args: DinoTrainingArguments, epochs: int) -> float:
    """k-NN top-1 (%) of the recipe's backbone after `epochs` epochs of training with the labels.

    The backbone the recipe would train (same spec, random init and global crop size) learns the
    classes of `<path>/train` (`fit_labels`, with the recipe's batch size and global crop scale), and is
    then evaluated exactly as the DINO teacher is. It says how much of the set this network can learn
    in that many epochs when it is told the classes.
    """
    torch.manual_seed(args.seed)
    backbone = build_student_teacher(args)[0].backbone
    fit_labels(
        backbone,
        path,
        epochs=epochs,
        crop_size=args.global_crops_size,
        crop_scale=tuple(args.global_crops_scale),
        batch_size=args.per_device_train_batch_size,
    )
    return backbone_knn(backbone, args, knn_sources(args))[METRIC]


def run_set(name: str, path: Path, config: str, output_root: str, extra: list[str], label_epochs: int = 0) -> dict:
    """One row of the table: pixels, the label reference if asked, then the recipe trained on the set."""
    pixels, num_classes = pixel_knn(path)
    num_train = sum(1 for _ in (path / "train").glob("*/*.png"))
    args = parse_training_args(
        ["--config", config, "--train_dir", str(path / "train"), "--eval_train_dir", str(path)]
        + ["--eval_train_split", "train", "--eval_split", "validation", "--samples_per_epoch", str(num_train)]
        + ["--output_dir", os.path.join(output_root, name), *extra]
    )
    row = {"set": name, "chance": 100 / num_classes, "pixels": pixels}
    if label_epochs:
        row["labels"] = label_reference(path, args, label_epochs)
    start = time.perf_counter()
    result = train(args)
    row["minutes"] = (time.perf_counter() - start) / 60
    row |= {"random init": result.knn_start.get(METRIC), "trained": result.knn.get(METRIC)}
    if result.stopped_by:
        print(f"{name}: training stopped by {result.stopped_by} at step {result.global_step}; no trained k-NN")
    print(f"{name}: " + ", ".join(f"{key} {_cell(value)}" for key, value in row.items() if key != "set"))
    return row


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: list[dict], label_epochs: int = 0) -> str:
    columns = ["chance", "pixels"] + (["labels"] if label_epochs else []) + ["random init", "trained"]
    epochs = f"{label_epochs} epoch" + ("s" if label_epochs != 1 else "")
    titles = [f"labels, {epochs}" if column == "labels" else column for column in columns]
    lines = ["| set | " + " | ".join(titles) + " | gain | minutes |", "|---" * (len(columns) + 3) + "|"]
    for row in rows:
        gain = None if None in (row["random init"], row["trained"]) else row["trained"] - row["random init"]
        cells = [row[key] for key in columns] + [gain, row["minutes"]]
        lines.append(f"| {row['set']} | " + " | ".join(_cell(value) for value in cells) + " |")
    return "\n".join(lines)


def hardware() -> str:
    """One line: the accelerator or the CPU, torch's version and threads, and today's date."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        device = f"CPU {model}, {os.cpu_count()} cores"
    return (
        f"{device}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
        f"{datetime.date.today().isoformat()}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="the recipe (a pretraining YAML file)")
    parser.add_argument("--sets", default="shapes,textures,digits", help=f"comma-separated: {', '.join(SETS)}, demo")
    parser.add_argument("--root", default=os.path.join(default_demo_root(), "small_data"), help="where sets are made")
    parser.add_argument("--output_dir", default="outputs/small_data", help="one training output folder per set")
    parser.add_argument("--max_minutes", type=float, default=None, help="start no new set after this many minutes")
    parser.add_argument(
        "--label_epochs",
        type=int,
        default=0,
        help="also train the recipe's backbone with the labels for this many epochs and report its k-NN "
        "(the `labels` column: what the network learns of the set in that many epochs when told the classes)",
    )
    args, extra = parser.parse_known_args()
    names = [name.strip() for name in args.sets.split(",") if name.strip()]
    unknown = [name for name in names if name not in SETS and name != "demo"]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}, demo")
    print(f"# small-data benchmark: {args.config} {' '.join(extra)}".rstrip())
    print(hardware())
    start = time.perf_counter()
    rows = []
    for name in names:
        if args.max_minutes is not None and (time.perf_counter() - start) / 60 > args.max_minutes:
            print(f"{name}: skipped, the benchmark has run over --max_minutes {args.max_minutes:g}")
            continue
        made = time.perf_counter()
        path = Path(make_demo_dataset()) if name == "demo" else make_set(name, args.root)
        print(f"{name}: {path} ready in {time.perf_counter() - made:.1f} s")
        rows.append(run_set(name, path, args.config, args.output_dir, extra, args.label_epochs))
    print(f"\nk-NN top-1 (%) at k = {K} on the validation split; {hardware()}")
    print(f"{args.config} {' '.join(extra)}".rstrip() + f"; {(time.perf_counter() - start) / 60:.1f} min in all\n")
    print(table(rows, args.label_epochs))


if __name__ == "__main__":
    main()
