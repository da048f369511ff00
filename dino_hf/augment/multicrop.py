"""DINO multi-crop augmentation on tensors.

Caron et al. 2021, Sec. 3.1 and Appendix: each image gives 2 global crops (224 px, scale (0.4, 1))
and N local crops (96 px, scale (0.05, 0.4)), all made with RandomResizedCrop (bicubic, aspect
ratio (3/4, 4/3)), a horizontal flip (p 0.5), colour jitter (0.4, 0.4, 0.2, 0.1 with p 0.8),
grayscale (p 0.2), Gaussian blur (sigma U(0.1, 2); p 1.0 on global crop 1, 0.1 on global crop 2,
0.5 on local crops), solarisation (p 0.2, threshold 128) on global crop 2 only, then ImageNet
normalisation. This is the reference's `DataAugmentationDINO`, re-written on tensors: the image is
decoded once, each crop is cut and resized as uint8 (torch's antialiased bicubic, PIL's filter),
then the colour operations run in float.

Randomness is drawn in `sample_params` (one `torch.rand` call per image, from an optional
`torch.Generator`), and `apply` is a pure function of the image and those parameters, so a test
can check the sampling rates and the pixel operations separately.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..models.image_processing_dino import IMAGENET_MEAN, IMAGENET_STD
from . import constants as draw
from .constants import LUMA


@dataclass(frozen=True)
class CropParams:
    """The random decisions for one crop.

    `top, left, height, width` is the region of the source image that is resized to the crop size.
    `jitter` is None when colour jitter is not applied, else `(order, brightness, contrast,
    saturation, hue)` where `order` is a permutation of (0, 1, 2, 3) naming the operations in
    that order (0 brightness, 1 contrast, 2 saturation, 3 hue). `blur_sigma` is None when the crop
    is not blurred.
    """

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


class MultiCropTransform:
    """Turns one image into `2 + local_crops_number` augmented, normalised crops.

    Args:
        global_crops_size: side of the 2 global crops (224 in the paper).
        local_crops_size: side of the local crops (96).
        global_crops_scale: RandomResizedCrop area range of the global crops ((0.4, 1.0)).
        local_crops_scale: area range of the local crops ((0.05, 0.4)).
        local_crops_number: number of local crops (8); 0 gives global crops only.
        global_crops_number: 2 (DINO's two global crops), or 1: the one view of a distillation run.
        ratio: RandomResizedCrop aspect-ratio range ((3/4, 4/3)).
        flip_p: horizontal flip probability (0.5).
        jitter_p: probability of applying colour jitter (0.8).
        brightness, contrast, saturation: jitter strengths; factors are U(1 - s, 1 + s) (0.4, 0.4, 0.2).
        hue: hue shift U(-hue, hue) in turns (0.1).
        grayscale_p: grayscale probability (0.2).
        blur_p: blur probability of (global crop 1, global crop 2, local crops) ((1.0, 0.1, 0.5)).
        blur_sigma: range of the Gaussian's standard deviation in pixels ((0.1, 2.0)).
        solarize_p: solarisation probability of global crop 2 (0.2); the other crops never are.
        solarize_threshold: pixel values >= this (of 255) are inverted (128).
        mean, std: normalisation (ImageNet).

    Call it on a uint8 tensor `(3, H, W)` (or `(1, H, W)`) or a PIL image; it returns a list of
    float tensors `[(3, G, G), (3, G, G), (3, L, L) x local_crops_number]`.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: Sequence[float] = (1.0, 0.1, 0.5),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_p: float = 0.2,
        solarize_threshold: int = 128,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        global_crops_number: int = 2,
    ):
        if global_crops_number not in (1, 2):
            raise ValueError(f"global_crops_number must be 1 or 2, got {global_crops_number}")
        for name, (low, high) in {
            "global_crops_scale": global_crops_scale,
            "local_crops_scale": local_crops_scale,
            "ratio": ratio,
            "blur_sigma": blur_sigma,
        }.items():
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        if len(blur_p) != 3:
            raise ValueError(f"blur_p gives (global crop 1, global crop 2, local crops) probabilities, got {blur_p}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a shift in turns), got {hue}")
        blur_pad = math.ceil(3 * blur_sigma[1])
        for name, size in {"global_crops_size": global_crops_size, "local_crops_size": local_crops_size}.items():
            if size <= blur_pad:
                raise ValueError(
                    f"{name}={size} is too small for a blur of sigma up to {blur_sigma[1]} (the kernel reaches "
                    f"{blur_pad} px); use a crop size above {blur_pad} or a smaller blur_sigma"
                )
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_number = global_crops_number
        self.ratio = tuple(ratio)
        self.flip_p = flip_p
        self.jitter_p = jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.blur_p = tuple(blur_p)
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_p = solarize_p
        self.solarize_threshold = solarize_threshold
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def num_crops(self) -> int:
        return self.global_crops_number + self.local_crops_number

    def _draw_index(self, index: int) -> int:
        """The crop's place in DINO's layout (0, 1 global, then local), which sets its blur probability."""
        return index if index < self.global_crops_number else index + 2 - self.global_crops_number

    def __call__(self, image: torch.Tensor | Image.Image, generator: torch.Generator | None = None):
        image = to_uint8_tensor(image)
        params = self.sample_params(image.shape[-2], image.shape[-1], generator)
        return self.apply(image, params)

    def sample_params(self, height: int, width: int, generator: torch.Generator | None = None) -> list:
        """Draws the `CropParams` of every crop of one `height` x `width` image."""
        draws = torch.rand(self.num_crops, draw.DRAWS_PER_CROP, generator=generator, dtype=torch.float64).tolist()
        params = []
        for index, u in enumerate(draws):
            scale = self.global_crops_scale if index < self.global_crops_number else self.local_crops_scale
            top, left, crop_h, crop_w = _resized_crop_box(height, width, scale, self.ratio, u[draw.BOX])
            jitter = None
            if u[draw.JITTER] < self.jitter_p:
                order = tuple(int(i) for i in np.argsort(u[draw.JITTER_ORDER], kind="stable"))
                brightness, contrast, saturation, hue = u[draw.JITTER_FACTORS]
                jitter = (
                    order,
                    _uniform(1 - self.brightness, 1 + self.brightness, brightness),
                    _uniform(1 - self.contrast, 1 + self.contrast, contrast),
                    _uniform(1 - self.saturation, 1 + self.saturation, saturation),
                    _uniform(-self.hue, self.hue, hue),
                )
            blurred = u[draw.BLUR] < draw.blur_probability(self._draw_index(index), self.blur_p)
            params.append(
                CropParams(
                    top=top,
                    left=left,
                    height=crop_h,
                    width=crop_w,
                    flip=u[draw.FLIP] < self.flip_p,
                    jitter=jitter,
                    grayscale=u[draw.GRAYSCALE] < self.grayscale_p,
                    blur_sigma=_uniform(*self.blur_sigma, u[draw.BLUR_SIGMA]) if blurred else None,
                    solarize=self._draw_index(index) == draw.SOLARIZED_CROP and u[draw.SOLARIZE] < self.solarize_p,
                )
            )
        return params

    def apply(self, image: torch.Tensor, params: Sequence[CropParams]) -> list:
        """Makes the crops of uint8 `image (3, H, W)` described by `params`: a list of float tensors."""
        if len(params) != self.num_crops:
            raise ValueError(
                f"expected {self.num_crops} CropParams ({self.global_crops_number} global + {self.local_crops_number} "
                f"local), got {len(params)}"
            )
        sizes = [self.global_crops_size] * self.global_crops_number + [self.local_crops_size] * self.local_crops_number
        return [self.augment_crop(image, p, size) for p, size in zip(params, sizes)]

    def augment_crop(self, image: torch.Tensor, p: CropParams, size: int) -> torch.Tensor:
        """One crop of uint8 `image (3, H, W)`: float `(3, size, size)`, normalised.

        The order of the reference: resized crop, flip, colour jitter, grayscale, blur, solarise,
        normalise. Crops run one by one: on one CPU core this beats batching the crops of one size,
        which needs gathers and scatters for every operation that only some crops get.
        """
        crop = TF.resized_crop(
            image, p.top, p.left, p.height, p.width, [size, size], InterpolationMode.BICUBIC, antialias=True
        )
        x = crop.float().div_(255)  # (3, size, size) in [0, 1]
        if p.flip:
            x = x.flip(-1)
        if p.jitter is not None:
            for op in p.jitter[0]:
                x = _JITTER_OPS[op](x, p.jitter[1 + op])
        if p.grayscale:
            x = grayscale(x).expand_as(x)
        if p.blur_sigma is not None:
            x = gaussian_blur(x, p.blur_sigma)
        if p.solarize:
            x = torch.where(x >= self.solarize_threshold / 255, 1 - x, x)
        return x.sub(self.mean).div_(self.std)


def to_uint8_tensor(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """A uint8 `(3, H, W)` view of a PIL image (converted to RGB) or a uint8 `(3 or 1, H, W)` tensor."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W), channels-last strides
    if (
        not isinstance(image, torch.Tensor)
        or image.dtype != torch.uint8
        or image.ndim != 3
        or image.shape[0] not in (1, 3)
    ):
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise TypeError(f"MultiCropTransform takes a PIL image or a uint8 tensor (3, H, W), got {got}")
    return image.expand(3, -1, -1)


def _uniform(low: float, high: float, u: float) -> float:
    return low + (high - low) * u


def _resized_crop_box(height: int, width: int, scale, ratio, u: Sequence[float]) -> tuple:
    """torchvision's RandomResizedCrop.get_params, fed with 22 uniform draws: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * _uniform(scale[0], scale[1], u[draw.BOX_ATTEMPTS][2 * attempt])
        aspect_ratio = math.exp(_uniform(log_ratio[0], log_ratio[1], u[draw.BOX_ATTEMPTS][2 * attempt + 1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            u_top, u_left = u[draw.BOX_POSITION]
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    # Fallback to a central crop with the aspect ratio clamped to the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB `x (3, H, W)`: `(1, H, W)`."""
    return LUMA[0] * x[0:1] + LUMA[1] * x[1:2] + LUMA[2] * x[2:3]


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x (3, H, W)` in [0, 1] scaled by `factor`."""
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean luma of the crop, as torchvision's adjust_contrast."""
    mean = grayscale(x).mean()
    return (factor * x + (1 - factor) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the per-pixel luma, as torchvision's adjust_saturation."""
    return (factor * x + (1 - factor) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotates the HSV hue of `x (3, H, W)` by `shift` turns.

    The same map as torchvision's adjust_hue (RGB -> HSV, shift H, HSV -> RGB), written with the
    closed form of HSV -> RGB: channel c = V - C * clamp(min(k, 4 - k), 0, 1) with
    k = (n_c + 6 H) mod 6, n = (5, 3, 1), V the max and C the max minus the min.
    """
    r, g, b = x[0:1], x[1:2], x[2:3]
    value = torch.maximum(torch.maximum(r, g), b)  # (1, H, W)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # The max channel picks the sector, R before G before B on ties as torchvision.
    hue = torch.where(r == value, (g - b) / safe, torch.where(g == value, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = hue + 6 * shift  # (1, H, W), in sixths of a turn
    k = torch.remainder(_HSV_OFFSETS + hue, 6)  # (3, H, W)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)
_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `x (C, H, W)` with standard deviation `sigma` pixels.

    Kernel radius ceil(3 sigma), reflect padding: torchvision's gaussian_blur with kernel size
    2 ceil(3 sigma) + 1. The two 1-D passes are sums of shifted views, faster on one CPU core than
    a depthwise convolution.
    """
    c, h, w = x.shape
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weight = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weight = (weight / weight.sum()).tolist()
    padded = F.pad(x.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")[0]  # (C, H + 2r, W + 2r)
    rows = padded[..., 0:w] * weight[0]
    for t in range(1, 2 * radius + 1):
        rows.add_(padded[..., t : t + w], alpha=weight[t])
    out = rows[..., 0:h, :] * weight[0]
    for t in range(1, 2 * radius + 1):
        out.add_(rows[..., t : t + h, :], alpha=weight[t])
    return out
