"""The pixel statistics a model was trained with: the mean and std its inputs are normalised by.

A backbone built by `dino_hf.models.backbones.build_backbone` carries them as `image_mean` and
`image_std` (3-tuples of floats): the start's own when it comes with trained weights (a transformers
folder's `preprocessor_config.json`, a timm model's `pretrained_cfg`), ImageNet's otherwise (every
run from scratch, a DinoModel preset, a reference DINO checkpoint). Training crops, the k-NN, the
evaluation scripts, the export's image processor and a distillation teacher all read them there.
"""

import os
from typing import NamedTuple

from torch import nn
from transformers.models.auto.image_processing_auto import get_image_processor_config

from .image_processing_dino import IMAGENET_MEAN, IMAGENET_STD


class Normalization(NamedTuple):
    """`(pixel / 255 - mean) / std`, per channel (RGB)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
# What a processor with `do_normalize: false` feeds its model: pixels scaled to [0, 1], nothing more.
UNNORMALIZED = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _triple(values, source: str, key: str) -> tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{source}: {key} has {len(values)} values; expected one per RGB channel (3)")
    return tuple(values)


def processor_normalization(config: dict, source: str) -> Normalization:
    """The normalisation an image processor's config (`preprocessor_config.json` as a dict) applies;
    ImageNet's when it names none."""
    if config.get("do_normalize") is False:
        return UNNORMALIZED
    if "image_mean" not in config or "image_std" not in config:
        return IMAGENET
    return Normalization(
        _triple(config["image_mean"], source, "image_mean"), _triple(config["image_std"], source, "image_std")
    )


def saved_normalization(name_or_path: str | os.PathLike, **hub_options) -> Normalization:
    """The normalisation of a transformers model folder or Hub id: its image processor's (`image_processor_config`),
    ImageNet's when it has none (or, offline, none in the cache)."""
    return processor_normalization(image_processor_config(name_or_path, **hub_options), str(name_or_path))


def image_processor_config(name_or_path: str | os.PathLike, **hub_options) -> dict:
    """The settings of the image processor saved with a model, as `AutoImageProcessor` reads them: the
    `image_processor` of `processor_config.json` (a processor saved by transformers v5), else
    `preprocessor_config.json`; `{}` when there is none (or, offline, none in the cache)."""
    try:
        return get_image_processor_config(str(name_or_path), **hub_options)
    except OSError:
        return {}


def timm_normalization(model: nn.Module) -> Normalization:
    """The mean and std of a timm model's `pretrained_cfg` (ImageNet's when it names none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" not in cfg or "std" not in cfg:
        return IMAGENET
    return Normalization(_triple(cfg["mean"], "pretrained_cfg", "mean"), _triple(cfg["std"], "pretrained_cfg", "std"))


def set_normalization_(backbone: nn.Module, normalization: Normalization) -> nn.Module:
    """Records `normalization` on `backbone` (`image_mean`, `image_std`); returns it."""
    backbone.image_mean, backbone.image_std = tuple(normalization.mean), tuple(normalization.std)
    return backbone


def recorded_normalization(backbone: nn.Module) -> Normalization | None:
    """The normalisation recorded on `backbone` by `set_normalization_`, None when it has none."""
    mean, std = getattr(backbone, "image_mean", None), getattr(backbone, "image_std", None)
    if mean is None or std is None:
        return None
    return Normalization(tuple(mean), tuple(std))


def normalization_of(backbone: nn.Module) -> Normalization:
    """The normalisation recorded on `backbone` (ImageNet's for a module that has none)."""
    return recorded_normalization(backbone) or IMAGENET


__all__ = [
    "IMAGENET",
    "Normalization",
    "image_processor_config",
    "normalization_of",
    "processor_normalization",
    "recorded_normalization",
    "saved_normalization",
    "set_normalization_",
    "timm_normalization",
]
