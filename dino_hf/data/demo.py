"""A small procedural image dataset for demos and tests, in imagefolder layout.

Each class is one shape drawn with one texture pattern, in a random colour. The images are
object-centric, like ImageNet's: the shape fills most of the frame, at a random position, scale and
rotation, over a lightly cluttered background (random strokes and blobs) with colour noise, so that
most random crops see the object. Neither raw pixels nor the features of a randomly initialised
network separate the classes well (weighted k-NN top-1 on the default dataset: centred pixels 30 %,
random-init ResNet-18 30 %, chance 12.5 %): what separates them is shape and texture, which DINO
has to learn (README, "The demo"). Generation is deterministic in the seed and takes a few seconds;
a finished dataset is reused.

Layout: `<root>/<name>/{train,validation}/<class>/<index>.png`.
"""

import json
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
TEXTURES = ("solid", "stripes", "dots", "checker")
_MARKER = "dataset_info.json"


def default_demo_root() -> str:
    """`$DINO_HF_DEMO_DIR`, else `$HF_HOME/dino_hf/demo`, else `~/.cache/dino_hf/demo`."""
    if os.environ.get("DINO_HF_DEMO_DIR"):
        return os.environ["DINO_HF_DEMO_DIR"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "dino_hf", "demo")
    return os.path.join(os.path.expanduser("~"), ".cache", "dino_hf", "demo")


def make_demo_dataset(
    root: str | None = None,
    num_classes: int = 8,
    train_per_class: int = 120,
    eval_per_class: int = 30,
    image_size: int = 64,
    seed: int = 0,
) -> str:
    """Generates (or finds) the demo dataset under `root` and returns its folder.

    The folder holds `train/` and `validation/`, each with one sub-folder per class
    (`00_circle_solid`, ...), and `dataset_info.json`, written last, which marks it complete.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)} (one shape per class), got {num_classes}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px for the shapes to be recognisable, got {image_size}")
    info = {
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "eval_per_class": eval_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    root = root or default_demo_root()
    name = f"shapes3_c{num_classes}_t{train_per_class}_e{eval_per_class}_s{image_size}_seed{seed}"
    path = os.path.join(root, name)
    if _is_complete(path, info):
        return path
    os.makedirs(root, exist_ok=True)
    staging = os.path.join(root, f".{name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    classes = [f"{k:02d}_{SHAPES[k]}_{TEXTURES[k % len(TEXTURES)]}" for k in range(num_classes)]
    for split, count, split_seed in (("train", train_per_class, 0), ("validation", eval_per_class, 1)):
        for k, class_name in enumerate(classes):
            folder = os.path.join(staging, split, class_name)
            os.makedirs(folder)
            rng = np.random.default_rng([seed, split_seed, k])
            for index in range(count):
                draw_sample(k, image_size, rng).save(os.path.join(folder, f"{index:05d}.png"))
    with open(os.path.join(staging, _MARKER), "w") as f:
        json.dump({**info, "classes": classes}, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete earlier attempt
    try:
        os.rename(staging, path)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(path, info):
            raise
    return path


def _is_complete(path: str, info: dict) -> bool:
    try:
        with open(os.path.join(path, _MARKER)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return all(saved.get(key) == value for key, value in info.items())


def draw_sample(class_index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB `size` x `size` image of class `class_index`."""
    # Background: a random colour gradient, then clutter strokes and blobs of random colours.
    corners = rng.uniform(0, 255, size=(2, 2, 3))
    t = np.linspace(0, 1, size)[:, None, None]
    s = np.linspace(0, 1, size)[None, :, None]
    background = (1 - t) * ((1 - s) * corners[0, 0] + s * corners[0, 1]) + t * (
        (1 - s) * corners[1, 0] + s * corners[1, 1]
    )
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(2, max(3, size // 10)))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
    # The object: the class's shape, filled with the class's texture in its colour family.
    mask = Image.new("L", (size, size), 0)
    radius = rng.uniform(0.34, 0.46) * size
    centre = rng.uniform(radius, size - radius, 2)
    _draw_shape(ImageDraw.Draw(mask), SHAPES[class_index], centre, radius, rng.uniform(0, 2 * math.pi))
    texture = _texture(class_index, size, rng)
    image.paste(Image.fromarray(texture), (0, 0), mask)
    # Colour noise over everything.
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _texture(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`(size, size, 3)` uint8 fill: two shades of a random hue in the class's pattern."""
    hue = rng.uniform(0, 1)  # colour is no cue: the class is in the shape and the texture
    light = _hue_to_rgb(hue, value=rng.uniform(0.85, 1.0))
    dark = _hue_to_rgb(hue, value=rng.uniform(0.25, 0.45))
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 10)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    pattern = TEXTURES[class_index % len(TEXTURES)]
    if pattern == "solid":
        on = np.ones((size, size), bool)
    elif pattern == "stripes":
        on = (u // (period / 2)) % 2 == 0
    elif pattern == "dots":
        on = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 > (period / 3.5) ** 2
    else:
        on = ((u // (period / 2)) + (v // (period / 2))) % 2 == 0
    return np.where(on[..., None], light, dark).astype(np.uint8)


def _hue_to_rgb(hue: float, value: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + 6 * (hue % 1.0)) % 6
    return 255 * value * (1 - 0.85 * np.clip(np.minimum(k, 4 - k), 0, 1))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, angle: float) -> None:
    cx, cy = centre

    def polygon(points):
        return [
            (cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
            for x, y in points
        ]

    def regular(n, r=radius):
        return [(r * math.cos(2 * math.pi * i / n), r * math.sin(2 * math.pi * i / n)) for i in range(n)]

    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.45 * radius * math.cos(angle), 0.45 * radius * math.sin(angle)
        draw.ellipse((cx - radius + dx, cy - radius + dy, cx + radius + dx, cy + radius + dy), fill=0)
    elif shape == "square":
        draw.polygon(polygon(regular(4)), fill=255)
    elif shape == "triangle":
        draw.polygon(polygon(regular(3)), fill=255)
    elif shape == "hexagon":
        draw.polygon(polygon(regular(6)), fill=255)
    elif shape == "star":
        points = [
            (
                radius * (1.0 if i % 2 == 0 else 0.42) * math.cos(math.pi * i / 5),
                radius * (1.0 if i % 2 == 0 else 0.42) * math.sin(math.pi * i / 5),
            )
            for i in range(10)
        ]
        draw.polygon(polygon(points), fill=255)
    else:  # cross
        w = radius * 0.35
        arm = [(-radius, -w), (radius, -w), (radius, w), (-radius, w)]
        draw.polygon(polygon(arm), fill=255)
        draw.polygon(polygon([(y, x) for x, y in arm]), fill=255)
