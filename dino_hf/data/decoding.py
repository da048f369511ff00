"""Safe decoding of one image of a dataset into an RGB PIL image.

`decode_image` accepts what an undecoded `datasets` `Image` column holds, raw bytes, a file path or a
PIL image, applies the EXIF orientation and converts any mode to RGB (`to_rgb`). An image that cannot
be used (empty, missing, not an image, truncated, corrupt, too large, too small) is not an error: it
gives None, and the reason is counted.
"""

import io
import os
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageOps

# PIL's own limit (about 89.5 M pixels, a 9459 x 9459 image); PIL refuses outright above twice it.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def decode_image(
    value,
    skipped: Counter | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
) -> Image.Image | None:
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


def _decode(value, max_pixels: int | None, min_side: int) -> tuple:
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
