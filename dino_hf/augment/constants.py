"""The numbers both multi-crop paths share: the layout of each crop's random draws, the luma weights.

`multicrop.MultiCropTransform` (per image, on the CPU) and `batch_multicrop.BatchMultiCrop` (per
batch, on the accelerator) read one row of `DRAWS_PER_CROP` uniforms per crop, in this layout, so that
both make their random decisions from the same numbers in the same way.
"""

# ITU-R 601-2 luma, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA = (0.299, 0.587, 0.114)

# One crop's uniform draws, by position in its row.
BOX_ATTEMPTS = slice(0, 20)  # RandomResizedCrop: 10 attempts x (area scale, log aspect ratio)
BOX_POSITION = slice(20, 22)  # top, left of the box
BOX = slice(0, 22)  # all the box's draws
FLIP = 22
JITTER = 23  # colour jitter on or off
JITTER_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
JITTER_ORDER = slice(28, 32)  # sort keys: the order of the four jitter operations
GRAYSCALE = 32
BLUR = 33  # Gaussian blur on or off
BLUR_SIGMA = 34
SOLARIZE = 35
DRAWS_PER_CROP = 36

# Crop index whose solarisation is drawn (global crop 2, as in the reference's second global transform).
SOLARIZED_CROP = 1


def blur_probability(crop_index: int, blur_p: tuple[float, float, float]) -> float:
    """The blur probability of crop `crop_index` (0 and 1 global, then local) from
    `blur_p = (global crop 1, global crop 2, local crops)`."""
    return blur_p[crop_index] if crop_index < 2 else blur_p[2]
