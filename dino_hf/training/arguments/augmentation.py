"""The augmentation settings of a run (the multi-crop views), and their checks."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class AugmentationArguments:
    """The multi-crop augmentation (paper Sec. 3.1 and Appendix)."""

    global_crops_size: int = field(default=224, metadata={"help": "Size of the 2 global crops."})
    local_crops_size: int = field(default=96, metadata={"help": "Size of the local crops."})
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0], metadata={"help": "Area range."})
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4], metadata={"help": "Area range."})
    local_crops_number: int = field(default=8, metadata={"help": "Number of local crops."})
    color_jitter: list[float] = field(
        default_factory=lambda: [0.4, 0.4, 0.2, 0.1],
        metadata={
            "help": "Colour jitter strengths: brightness, contrast, saturation (factors U(1 - s, 1 + s)) and hue "
            "(shift U(-h, h) in turns, h <= 0.5); raise them where colour tells images apart but not classes."
        },
    )
    color_jitter_p: float = field(default=0.8, metadata={"help": "Probability of a crop's colour jitter."})
    grayscale_p: float = field(default=0.2, metadata={"help": "Probability of a crop turning grayscale."})
    blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0],
        metadata={"help": "Range of the Gaussian blur's sigma in pixels of the crop; scale it with small crops."},
    )
    blur_p: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.5],
        metadata={"help": "Blur probabilities of global crop 1, global crop 2 and the local crops."},
    )
    solarize_p: float = field(default=0.2, metadata={"help": "Solarisation probability of global crop 2."})


def check_augmentation(args: "DinoTrainingArguments") -> None:
    """The crops' sizes, scales and count, and the photometric augmentations' strengths and probabilities."""
    check_ranges(args, positive=("global_crops_size", "local_crops_size"), non_negative=("local_crops_number",))
    for name in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(args, name)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            fail(name, scale, "two numbers 0 < low <= high <= 1, e.g. 0.4 1.0")
    jitter = args.color_jitter
    if len(jitter) != 4 or not all(0 <= s <= 1 for s in jitter[:3]) or not 0 <= jitter[3] <= 0.5:
        fail(
            "color_jitter",
            jitter,
            "four strengths: brightness, contrast, saturation in [0, 1] and hue in [0, 0.5], e.g. 0.4 0.4 0.2 0.1",
        )
    for name in ("color_jitter_p", "grayscale_p", "solarize_p"):
        if not 0 <= getattr(args, name) <= 1:
            fail(name, getattr(args, name), "a probability in [0, 1]")
    if len(args.blur_sigma) != 2 or not 0 < args.blur_sigma[0] <= args.blur_sigma[1]:
        fail("blur_sigma", args.blur_sigma, "two numbers 0 < low <= high, e.g. 0.1 2.0 (pixels)")
    if len(args.blur_p) != 3 or not all(0 <= p <= 1 for p in args.blur_p):
        fail(
            "blur_p", args.blur_p, "three probabilities (global crop 1, global crop 2, local crops), e.g. 1.0 0.1 0.5"
        )


__all__ = ["AugmentationArguments", "check_augmentation"]
