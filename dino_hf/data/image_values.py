"""Whether the image column of a stream holds images, told before training starts.

A column of the `Image` feature holds images by its type: an undecodable one among them is bad data,
skipped and counted (`dino_hf.data.decoding`). A column of labels or numbers holds none, by its type
too. A column of strings, bytes or of an unknown type may hold file paths or encoded images, so its
first values are decoded: when none of them is an image at all (no such file, not an image format, not
an image value), the column is the wrong one, and training on it would skip every sample.
"""

import itertools
from collections import Counter

from datasets import ClassLabel, IterableDataset, Value
from datasets import Image as ImageFeature

from .decoding import decode_image

# Values of a column of strings, bytes or unknown type decoded to tell whether it holds images.
PEEKED_VALUES = 8
# Why `decode_image` gives up on a value that is no image at all (the others mean a damaged image).
_NO_IMAGE_REASONS = frozenset({"missing_file", "not_an_image", "no_image_value"})
_TEXT_OR_BYTES = frozenset({"string", "large_string", "binary", "large_binary"})


def check_image_column(stream: IterableDataset, column: str, *, named_by_user: bool, source: str) -> None:
    """Raise ValueError when the column `column` of `stream` holds no images (see the module docstring).

    Args:
        stream: the training stream, as `load_image_stream` returns it (its image column undecoded).
        column: its image column.
        named_by_user: whether `--image_column_name` named it (else it was found by its type or name).
        source: the data as the run describes it, for the message.
    """
    features = stream.features or {}
    feature = features.get(column)
    if isinstance(feature, ImageFeature):
        return
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype not in _TEXT_OR_BYTES):
        holds = f"{'class labels' if isinstance(feature, ClassLabel) else feature.dtype + ' values'}, not images"
    else:
        values = [row[column] for row in itertools.islice(iter(stream), PEEKED_VALUES)]
        reasons = []
        for value in values:
            skipped = Counter()
            if decode_image(value, skipped) is not None:
                return
            reasons.append(next(iter(skipped)))
        if not values or not set(reasons) <= _NO_IMAGE_REASONS:
            return  # no rows, or damaged images: bad data, skipped and counted as training goes
        examples = ", ".join(f"{_short(value)} ({reason})" for value, reason in zip(values[:3], reasons))
        holds = f"no images: its first values are {examples}"
    named = "--image_column_name names" if named_by_user else "the image column found is"
    images = [name for name, kind in features.items() if isinstance(kind, ImageFeature)]
    accepted = f"the columns with the Image feature are {images}" if images else f"the columns are {list(features)}"
    raise ValueError(
        f"{source}: {named} {column!r}, which holds {holds}; {accepted}: pass the one that holds images (or "
        "paths to image files) with --image_column_name"
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["PEEKED_VALUES", "check_image_column"]
