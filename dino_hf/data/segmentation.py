"""Semantic segmentation data: image / mask pairs, and a generated offline set of them.

A **mask** is a single-channel image (PIL mode L, P, I, I;16 or 1) of the image's size whose pixel
values are class ids; `IGNORE_INDEX` (255) marks pixels that count for nothing. Pairs come from a
`datasets` dataset with an image and a mask column (`segmentation_rows` finds them), or from a
folder (`segmentation_folder`):

    <folder>/images/<relative path>.<jpg, png, ...>
    <folder>/masks/<the same relative path>.png

The generated set (`make_segmentation_set`) is the small-data benchmark's `shapes` set
(benchmarks/small_data.py) with its masks: each image holds one of 10 shapes on a cluttered
background, drawn by `draw_shape_with_mask`; class 0 is the background and shape k is class k + 1.
Its images are those of the benchmark's `shapes` set of the same seed, pixel for pixel. The drawing
helpers of the benchmark's other sets (colours, backgrounds, painting) live here with the shapes.
"""

import io
import json
import math
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from .demo import default_demo_root
from .sources import IMAGE_EXTENSIONS

IGNORE_INDEX = 255  # mask value of unlabelled pixels (ADE20K's and mmsegmentation's convention)
MASK_MODES = ("L", "P", "I", "I;16", "1")  # single-channel PIL modes: the values are class ids
# Bump when the generated set changes, so that a set made by the old generator is not reused.
SEGMENTATION_SET_VERSION = 1
_MARKER = "dataset_info.json"


# ---- drawing: the small-data benchmark's shapes, on clutter -------------------------------------


def random_colour(rng: np.random.Generator, away_from: np.ndarray | None = None) -> np.ndarray:
    """A random RGB colour; with `away_from`, one at least 200 (L1) from that colour where 20 tries find one."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):
        if away_from is None or np.abs(colour - away_from).sum() >= 200:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def blotchy(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float: a `cells` x `cells` grid of random colours, smoothly upsampled."""
    grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)


def cluttered_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Soft blotches of colour with 1-3 thin random strokes and arcs on top: clutter the object has to be told from."""
    image = Image.fromarray(blotchy(size, int(rng.integers(2, 4)), rng).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(-size // 4, size + size // 4, 4))
        if rng.random() < 0.6:
            draw.line((x0, y0, x1, y1), fill=colour, width=1)
        else:
            box = (min(x0, x1), min(y0, y1), max(x0, x1) + 4, max(y0, y1) + 4)
            draw.arc(box, float(rng.uniform(0, 360)), float(rng.uniform(0, 360)), fill=colour, width=1)
    return image


def paint(background: Image.Image, mask: Image.Image, colour: np.ndarray, noise: float, rng) -> Image.Image:
    """`colour` where `mask` is set, over `background`, then Gaussian colour noise of std `noise`."""
    size = background.size[0]
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    pixels = (1 - alpha) * np.asarray(background, dtype=np.float32) + alpha * colour
    pixels += rng.normal(0, noise, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def mean_colour(image: Image.Image, mask: Image.Image) -> np.ndarray:
    """Mean colour of `image` under `mask` (the background the object is drawn on)."""
    weights = np.asarray(mask, dtype=np.float32)[..., None] + 1e-3
    return (np.asarray(image, dtype=np.float32) * weights).sum((0, 1)) / weights.sum()


SHAPES = ("circle", "triangle", "square", "star", "plus", "arrow", "heart", "crescent", "spiral", "zigzag")
_OPEN_SHAPES = ("spiral", "zigzag")  # always drawn as a stroke


def _shape_points(shape: str, n: int = 60) -> list[tuple[float, float]]:
    """The outline of `shape` in unit coordinates (radius about 1), before rotation and scaling."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return list(zip(np.cos(t), np.sin(t)))
    if shape in ("triangle", "square"):
        sides = 3 if shape == "triangle" else 4
        return [(math.cos(2 * math.pi * i / sides), math.sin(2 * math.pi * i / sides)) for i in range(sides)]
    if shape == "star":
        return [
            (
                (1.0 if i % 2 == 0 else 0.4) * math.cos(math.pi * i / 5),
                (1.0 if i % 2 == 0 else 0.4) * math.sin(math.pi * i / 5),
            )
            for i in range(10)
        ]
    if shape == "plus":
        w = 0.33
        return [
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
            (-w, -1),
        ]
    if shape == "arrow":
        return [(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return list(zip(x / 16, -(y + 2) / 16))
    if shape == "crescent":
        outer = np.linspace(-0.8 * np.pi, 0.8 * np.pi, n // 2)
        inner = np.linspace(0.62 * np.pi, -0.62 * np.pi, n // 2)
        return list(zip(np.cos(outer), np.sin(outer))) + list(zip(0.45 + 0.75 * np.cos(inner), 0.75 * np.sin(inner)))
    if shape == "spiral":
        t = np.linspace(0, 4 * np.pi, n)
        return list(zip(t / (4 * np.pi) * np.cos(t), t / (4 * np.pi) * np.sin(t)))
    # zigzag: five strokes across
    return [(-1 + 0.4 * i, 0.45 if i % 2 else -0.45) for i in range(6)]


def draw_shape_with_mask(class_index: int, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A shape of class `class_index`, outlined or filled, at a random place, scale and rotation, and
    the mask it was painted through: `(RGB image, mode L mask, 255 on the shape and 0 elsewhere)`."""
    shape = SHAPES[class_index]
    background = cluttered_background(size, rng)
    radius = rng.uniform(0.28, 0.44) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle, flip = rng.uniform(0, 2 * math.pi), rng.choice((-1.0, 1.0))
    cos, sin = math.cos(angle), math.sin(angle)
    points = [
        (cx + radius * (x * cos - flip * y * sin), cy + radius * (x * sin + flip * y * cos))
        for x, y in _shape_points(shape)
    ]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    width = int(rng.integers(3, 6))
    if shape in _OPEN_SHAPES:
        draw.line(points, fill=255, width=width, joint="curve")
    elif rng.random() < 0.5:
        draw.polygon(points, fill=255)
    else:  # the outline: the filled shape less its erosion
        draw.polygon(points, fill=255)
        mask = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(2 * width - 1))))
    colour = random_colour(rng, away_from=mean_colour(background, mask))
    return paint(background, mask, colour, noise=8, rng=rng), mask


def draw_shape(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """The image of `draw_shape_with_mask` alone (the small-data benchmark's `shapes` set)."""
    return draw_shape_with_mask(class_index, size, rng)[0]


# ---- the generated segmentation set -------------------------------------------------------------


def make_segmentation_set(
    root: "str | os.PathLike | None" = None,
    seed: int = 0,
    train_per_class: int = 100,
    eval_per_class: int = 30,
    image_size: int = 64,
) -> Path:
    """Generates (or finds) the shapes segmentation set under `root` and returns its folder.

    The folder holds `train/` and `validation/`, each in the `segmentation_folder` layout:
    `images/<k>_<shape>/<index>.png` (RGB) and `masks/<k>_<shape>/<index>.png` (mode L: 0 background,
    k + 1 on shape k). The class sub-folders also make `images/` an image folder with class labels
    for pretraining and k-NN. `dataset_info.json`, written last, marks a finished set, which is reused;
    it lists the classes (`background` first). Deterministic in `seed`; the defaults and random draws
    are those of the benchmark's `shapes` set, so its images are the same. `root` defaults to
    `default_demo_root()/segmentation`.
    """
    info = {"version": SEGMENTATION_SET_VERSION, "train_per_class": train_per_class, "eval_per_class": eval_per_class}
    info |= {"image_size": image_size, "seed": seed, "classes": ["background", *SHAPES]}
    info |= {"ignore_index": IGNORE_INDEX}
    root = Path(root or os.path.join(default_demo_root(), "segmentation"))
    name = f"shapes_v{SEGMENTATION_SET_VERSION}_t{train_per_class}_e{eval_per_class}_s{image_size}_seed{seed}"
    path = root / name
    if _is_complete(path, info):
        return path
    staging = root / f".{name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for split, count, split_seed in (("train", train_per_class, 0), ("validation", eval_per_class, 1)):
        for k, shape in enumerate(SHAPES):
            images, masks = (staging / split / kind / f"{k:02d}_{shape}" for kind in ("images", "masks"))
            images.mkdir(parents=True)
            masks.mkdir(parents=True)
            rng = np.random.default_rng([seed, split_seed, k])  # the benchmark's seeds: the same images
            for index in range(count):
                image, shape_mask = draw_shape_with_mask(k, image_size, rng)
                image.save(images / f"{index:05d}.png")
                classes = np.where(np.asarray(shape_mask) >= 128, k + 1, 0).astype(np.uint8)
                Image.fromarray(classes, mode="L").save(masks / f"{index:05d}.png")
    (staging / _MARKER).write_text(json.dumps(info, indent=2))
    shutil.rmtree(path, ignore_errors=True)  # an older or unfinished one
    try:
        staging.rename(path)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(path, info):
            raise
    return path


def _is_complete(path: Path, info: dict) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()) == info
    except (OSError, ValueError):
        return False


# ---- reading pairs ------------------------------------------------------------------------------


def segmentation_folder(folder: "str | os.PathLike") -> datasets.Dataset:
    """The image / mask pairs of a folder in the layout of the module docstring, as a dataset with
    the undecoded `Image` columns `image` and `mask`, in sorted path order.

    Every image file under `images/` (any depth) needs its mask: `masks/` + the same relative path
    with the extension `.png`; a missing one is refused, since it means the layout is wrong.
    """
    folder = Path(folder)
    images_root, masks_root = folder / "images", folder / "masks"
    if not images_root.is_dir() or not masks_root.is_dir():
        raise ValueError(
            f"{folder} needs the sub-folders images/ and masks/ (masks/<relative path of the image>.png); "
            "or pass a dataset with --dataset_name"
        )
    images = sorted(
        path
        for path in images_root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )
    if not images:
        raise ValueError(f"{images_root} holds no image files")
    masks = [masks_root / path.relative_to(images_root).with_suffix(".png") for path in images]
    missing = [mask for mask in masks if not mask.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(images)} images in {images_root} have no mask; the first missing is "
            f"{missing[0]} (a mask is masks/<the image's relative path, extension .png>)"
        )
    undecoded = datasets.Image(decode=False)
    return datasets.Dataset.from_dict(
        {
            "image": [{"path": str(path), "bytes": None} for path in images],
            "mask": [{"path": str(path), "bytes": None} for path in masks],
        },
        features=datasets.Features({"image": undecoded, "mask": undecoded}),
    )


def _open(value) -> Image.Image | None:
    """A loaded PIL image from what an image column holds (`{"bytes", "path"}`, bytes, a path or a PIL
    image), EXIF orientation applied and the mode kept; None when it cannot be read."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            value = Image.open(value)
        if not isinstance(value, Image.Image):
            return None
        value.load()
        return ImageOps.exif_transpose(value)  # as decode_image does to the image, so that both stay aligned
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


def decode_mask(value) -> np.ndarray | None:
    """The class ids (H, W) of one mask-column value, or None when it cannot be read or is not a
    single-channel image (bad data: the caller skips and counts it)."""
    mask = _open(value)
    if mask is None or mask.mode not in MASK_MODES:
        return None
    return np.asarray(mask).astype(np.int64)


def segmentation_rows(
    rows, image_column_name: str | None = None, mask_column_name: str | None = None
) -> tuple[object, str, str]:
    """`(rows, image_column, mask_column)` of a dataset of image / mask pairs, both columns left
    undecoded (`decode_image` and `decode_mask` decode them and skip bad values).

    A column not named is found from the first row: among the `Image` columns (or, without
    features, the columns whose value opens as an image), the mask is the one single-channel column
    (`MASK_MODES`) and the image the one other column; anything else is ambiguous and refused.
    """
    features = getattr(rows, "features", None) or {}
    first = next(iter(rows), None)
    if first is None:
        raise ValueError("the segmentation dataset has no rows; check the split and the data files")
    for name in (image_column_name, mask_column_name):
        if name is not None and name not in first:
            raise ValueError(f"column {name!r} not found; the dataset has {list(first)}")
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    modes = {name: getattr(_open(first[name]), "mode", None) for name in images or list(first)}
    candidates = [name for name, mode in modes.items() if mode is not None]
    masks = [name for name in candidates if modes[name] in MASK_MODES and name != image_column_name]
    mask_column = mask_column_name or _one(masks, "mask", "single-channel image", "--mask_column_name")
    mode = getattr(_open(first[mask_column]), "mode", None)
    if mode not in MASK_MODES:
        raise ValueError(
            f"mask column {mask_column!r} holds {mode or 'unreadable'} images; a mask is a single-channel "
            f"image of class ids (PIL mode {', '.join(MASK_MODES)}), not colour-coded"
        )
    others = [name for name in candidates if name != mask_column and modes[name] not in MASK_MODES]
    image_column = image_column_name or _one(others, "image", "multi-channel image", "--image_column_name")
    for name in (image_column, mask_column):
        if isinstance(features.get(name), datasets.Image) and features[name].decode:
            rows = rows.cast_column(name, datasets.Image(decode=False))
    return rows, image_column, mask_column


def _one(names: list, what: str, kind: str, option: str) -> str:
    if len(names) != 1:
        found = f"the {kind} columns {names}" if names else f"no {kind} column"
        raise ValueError(f"cannot tell the {what} column: the first row has {found}; name it with {option}")
    return names[0]


def num_mask_classes(rows, mask_column: str) -> int:
    """The largest class id in the masks of `rows` + 1 (`IGNORE_INDEX` aside); unreadable masks are
    left out. Reads every mask once."""
    largest = -1
    for row in rows:
        mask = decode_mask(row[mask_column])
        if mask is not None:
            labelled = mask[mask != IGNORE_INDEX]
            largest = max(largest, int(labelled.max()) if labelled.size else -1)
    if largest < 0:
        raise ValueError(f"no labelled pixel in the masks of column {mask_column!r}; check the mask column")
    return largest + 1


__all__ = [
    "IGNORE_INDEX",
    "MASK_MODES",
    "SHAPES",
    "blotchy",
    "cluttered_background",
    "decode_mask",
    "draw_shape",
    "draw_shape_with_mask",
    "make_segmentation_set",
    "mean_colour",
    "num_mask_classes",
    "paint",
    "random_colour",
    "segmentation_folder",
    "segmentation_rows",
]
