"""DINO multi-crop on the accelerator, one batch at a time.

The CPU path (`multicrop.MultiCropTransform`) makes the 2 + N crops of each image in a data
worker; one H200 trains ViT-S/16 faster than dozens of CPU cores can crop. Here the workers only
decode and cap each image to one square size (`DecodeAndCap`: short side resized to S, then an
S x S crop, uint8), and `BatchMultiCrop` makes every crop of the whole batch on the device:

- random resized crop + flip as two batched matrix products: each crop's rows and columns are
  resampled by a `(size, S)` matrix holding the weights of torch's antialiased bicubic resize
  (PIL's filter, a = -0.5) of that crop's box, so the result is `TF.resized_crop(..., antialias=True)`
  in float for every crop at once, and a flip is the column matrix reversed;
- colour jitter in a per-sample random order: at each of the 4 positions brightness, contrast and
  saturation are one blend `f x + (1 - f) target` (target 0, the mean luma or the luma), the
  identity (f = 1) for samples doing hue there, and hue runs on the samples that do it there;
- grayscale, solarisation and the mask of which samples are jittered are `torch.where`s;
- Gaussian blur with a per-sample sigma, on the samples that are blurred: one depthwise
  convolution whose kernels (one per sample) share the largest radius; reflect padding at that
  radius gives the same pixels as torchvision's padding at each sample's own radius.

The rows that take hue at a jitter position, and the rows that are blurred, are picked with
`nonzero` (a few host-device synchronisations per batch); the other operations never wait.

The random decisions follow the same distributions as `MultiCropTransform` (same draws per crop,
same meaning), so the recipe's rates hold (docs/recipe.md#multi-crop-augmentation); a test checks
them over many samples and checks each pixel operation against the CPU path. Differences from the
CPU path: the crop is resampled in float instead of rounded to uint8, and the crop box is drawn in
the S x S capped image rather than the whole decoded image (so the scale range is relative to the
centre or random square)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from . import constants as draw
from .constants import LUMA
from .multicrop import MultiCropTransform, to_uint8_tensor

# Bicubic filter of PIL and of torch's antialiased resize.
_CUBIC_A = -0.5


class DecodeAndCap:
    """The CPU side of `--augment_on gpu`: one decoded image -> `[uint8 (3, S, S)]`.

    The short side is resized to `image_size` (antialiased bicubic, up or down), then a square is
    cut from the long side: at a random position drawn from `generator` (`random_crop=True`, so
    that over epochs the whole image is seen) or in the centre. Called by `MultiCropStream` as
    `transform(image, generator)`; the one-element list goes through `collate_multicrop` unchanged
    and gives `batch["crops"] == [uint8 (B, 3, S, S)]`.

    Args:
        image_size (`int`, defaults to 288): S, the side of the capped image. Crop boxes are drawn
            in it, so a global crop of scale 0.4 is cut from 0.63 S px (182 px at 288) and
            resized to 224; larger S keeps more detail and costs host-to-device bandwidth.
        random_crop (`bool`, defaults to `True`): random rather than centre square.
    """

    def __init__(self, image_size: int = 288, random_crop: bool = True):
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = image_size
        self.random_crop = random_crop

    def __call__(self, image: torch.Tensor | Image.Image, generator: torch.Generator | None = None) -> list:
        image = to_uint8_tensor(image)  # (3, H, W)
        size = self.image_size
        height, width = image.shape[-2:]
        if min(height, width) != size:
            short, long = (height, width) if height <= width else (width, height)
            long = max(size, round(long * size / short))
            new_hw = (size, long) if height <= width else (long, size)
            image = TF.resize(image, list(new_hw), InterpolationMode.BICUBIC, antialias=True)
            height, width = new_hw
        top, left = (height - size) // 2, (width - size) // 2
        if self.random_crop:
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            top, left = int(u[0] * (height - size + 1)), int(u[1] * (width - size + 1))
        return [image[:, top : top + size, left : left + size].contiguous()]  # (3, S, S)


@dataclass
class BatchCropParams:
    """The random decisions for a group of `n` crops of the same size of `B` images, as tensors.

    Rows are crop-major: row `c * B + b` is crop `c` of image `b`, the order of the output batch.
    `boxes (n*B, 4)` holds `(top, left, height, width)` in pixels of the capped image; `flip`,
    `jitter`, `grayscale`, `blur`, `solarize` are bool `(n*B,)`; `factors (n*B, 4)` are the
    brightness, contrast, saturation factors and the hue shift; `order (n*B, 4)` names the jitter
    operation at each position (0 brightness, 1 contrast, 2 saturation, 3 hue); `sigma (n*B,)` the
    blur's standard deviation in pixels (meaningful where `blur`).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


class BatchMultiCrop(nn.Module):
    """DINO's multi-crop of a batch of capped images, on their device.

    Takes the parameters of `MultiCropTransform` (the paper's defaults: 2 x 224 px global crops of
    scale (0.4, 1), 8 x 96 px local crops of scale (0.05, 0.4), ratio (3/4, 4/3), flip 0.5, jitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur (1.0, 0.1, 0.5) with sigma U(0.1, 2),
    solarisation 0.2 on global crop 2, ImageNet normalisation).

    Call it on uint8 images `(B, 3, S, S)` (or any `(B, 3, H, W)` of one size) with an optional
    `torch.Generator` on the images' device; it returns float32 crops on that device,
    `[(B, 3, G, G), (B, 3, G, G), (B, 3, L, L) x local_crops_number]`, ready for `train_step`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.config = MultiCropTransform(*args, **kwargs)  # validates and holds the parameters
        self.register_buffer("mean", self.config.mean.view(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("std", self.config.std.view(1, 3, 1, 1).clone(), persistent=False)

    @property
    def num_crops(self) -> int:
        return self.config.num_crops

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(
                f"BatchMultiCrop takes uint8 images (B, 3, H, W) (e.g. the batch of DecodeAndCap), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        batch, _, height, width = images.shape
        pixels = images.float().div_(255)  # (B, 3, H, W) in [0, 1]
        params = self.sample_params(batch, height, width, generator, images.device)
        c = self.config
        global_crops = self.apply(pixels, params[0], c.global_crops_size)  # (2B, 3, G, G)
        crops = list(global_crops.chunk(2))
        if c.local_crops_number:
            local_crops = self.apply(pixels, params[1], c.local_crops_size)  # (N*B, 3, L, L)
            crops += list(local_crops.chunk(c.local_crops_number))
        return crops

    def sample_params(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> list:
        """Draws the decisions of every crop of `batch` images of `height` x `width` pixels.

        Returns `[global BatchCropParams (2B rows), local BatchCropParams (N*B rows)]` (the second
        only when there are local crops). The draws have the layout of `MultiCropTransform`'s:
        36 uniforms per crop, read the same way.
        """
        c = self.config
        u = torch.rand(c.num_crops * batch, draw.DRAWS_PER_CROP, generator=generator, device=device)  # (crops*B, 36)
        crop_index = torch.arange(c.num_crops, device=u.device).repeat_interleave(batch)  # (crops*B,)
        blur_p = torch.tensor(
            [draw.blur_probability(index, c.blur_p) for index in range(c.num_crops)], device=u.device
        )
        strengths = torch.tensor([c.brightness, c.contrast, c.saturation, c.hue], device=u.device)
        low = torch.tensor([1 - c.brightness, 1 - c.contrast, 1 - c.saturation, -c.hue], device=u.device)
        flat = BatchCropParams(
            boxes=_resized_crop_boxes(height, width, u, batch, c),
            flip=u[:, draw.FLIP] < c.flip_p,
            jitter=u[:, draw.JITTER] < c.jitter_p,
            factors=low + 2 * strengths * u[:, draw.JITTER_FACTORS],  # (crops*B, 4)
            order=torch.argsort(u[:, draw.JITTER_ORDER], dim=1, stable=True),  # a uniform random permutation per row
            grayscale=u[:, draw.GRAYSCALE] < c.grayscale_p,
            blur=u[:, draw.BLUR] < blur_p[crop_index],
            sigma=c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * u[:, draw.BLUR_SIGMA],
            solarize=(crop_index == draw.SOLARIZED_CROP) & (u[:, draw.SOLARIZE] < c.solarize_p),
        )
        split = 2 * batch
        groups = [BatchCropParams(**{k: v[:split] for k, v in vars(flat).items()})]
        if c.local_crops_number:
            groups.append(BatchCropParams(**{k: v[split:] for k, v in vars(flat).items()}))
        return groups

    def apply(self, pixels: torch.Tensor, params: BatchCropParams, size: int) -> torch.Tensor:
        """Crops of float images `pixels (B, 3, H, W)` in [0, 1] described by `params` (n*B rows):
        normalised float `(n*B, 3, size, size)`, rows crop-major.

        The order of the reference: resized crop, flip, colour jitter, grayscale, blur, solarise,
        normalise.
        """
        x = resized_crops(pixels, params.boxes, params.flip, size)  # (n*B, 3, size, size)
        x = color_jitter(x, params.jitter, params.factors, params.order)
        x = torch.where(params.grayscale.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        blurred = params.blur.nonzero().squeeze(1)  # the rows drawn for a blur (10 % of global crop 2)
        if blurred.numel():
            sharp = x.index_select(0, blurred)
            x.index_copy_(0, blurred, gaussian_blur(sharp, params.sigma[blurred], self.config.blur_sigma[1]))
        threshold = self.config.solarize_threshold / 255
        x = torch.where(params.solarize.view(-1, 1, 1, 1) & (x >= threshold), 1 - x, x)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def _resized_crop_boxes(height: int, width: int, u: torch.Tensor, batch: int, config) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for every row of `u (crops*B, 36)` at once:
    `(crops*B, 4)` float boxes `(top, left, height, width)`, integral values.

    Ten attempts per row (draws 0-19); the first one that fits is kept, else a centre crop with
    the aspect ratio clamped to the range; the position comes from draws 20 and 21.
    """
    rows = u.shape[0]
    is_global = torch.arange(rows, device=u.device) < 2 * batch
    scale = torch.where(
        is_global.unsqueeze(1),
        torch.tensor(config.global_crops_scale, device=u.device),
        torch.tensor(config.local_crops_scale, device=u.device),
    )  # (rows, 2)
    draws = u[:, draw.BOX_ATTEMPTS].view(rows, 10, 2)  # (rows, attempt, [scale, log ratio])
    area = height * width * (scale[:, :1] + (scale[:, 1:] - scale[:, :1]) * draws[..., 0])  # (rows, 10)
    log_low, log_high = math.log(config.ratio[0]), math.log(config.ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[..., 1])  # (rows, 10)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (rows, 10)
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)  # first fitting attempt (0 when none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (rows,)
    # Fallback of torchvision: the whole image, its aspect ratio clamped to the range.
    in_ratio = width / height
    if in_ratio < min(config.ratio):
        fallback_w, fallback_h = width, round(width / min(config.ratio))
    elif in_ratio > max(config.ratio):
        fallback_w, fallback_h = round(height * max(config.ratio)), height
    else:
        fallback_w, fallback_h = width, height
    fallback_h, fallback_w = max(1, min(fallback_h, height)), max(1, min(fallback_w, width))
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    u_top, u_left = u[:, draw.BOX_POSITION].unbind(1)
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(found, top, (height - h).div(2, rounding_mode="floor"))
    left = torch.where(found, left, (width - w).div(2, rounding_mode="floor"))
    return torch.stack((top, left, h, w), dim=1)  # (rows, 4)


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, in_size: int) -> torch.Tensor:
    """Antialiased bicubic resampling matrices: `(R, size, in_size)`, one per row of `start, length (R,)`.

    Row `i` of matrix `r` gives output pixel `i` of the resize of input pixels
    `[start, start + length)` to `size` pixels, as torch's `interpolate(mode="bicubic",
    antialias=True)` and PIL: centre `(i + 0.5) * scale` with `scale = length / size`, filter
    stretched by `max(scale, 1)` (support 2 of it on each side), taps outside the box dropped,
    weights normalised to sum 1. The weights are computed on a window of taps around each centre
    and scattered into the dense matrix.
    """
    scale = (length / size).view(-1, 1, 1)  # (R, 1, 1)
    stretch = scale.clamp(min=1.0)
    centre = (
        torch.arange(size, device=start.device, dtype=torch.float32).view(1, -1, 1) + 0.5
    ) * scale  # (R, size, 1)
    first = torch.floor(centre - 2 * stretch + 0.5).clamp(min=0)  # first tap of the support, in the box
    # A support spans at most 4 stretch + 1 taps, and the stretch at most in_size / size.
    taps = math.ceil(4 * max(in_size / size, 1.0)) + 2
    j = first + torch.arange(taps, device=start.device, dtype=torch.float32)  # (R, size, taps), box coordinates
    t = ((j + 0.5 - centre) / stretch).abs()  # distance in filter units
    a = _CUBIC_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    weights = torch.where(t < 1, near, torch.where(t < 2, far, 0.0))
    weights = torch.where(j < length.view(-1, 1, 1), weights, 0.0)
    weights = weights / weights.sum(dim=2, keepdim=True)
    index = (j + start.view(-1, 1, 1)).clamp(max=in_size - 1).long()  # taps beyond the box have weight 0
    dense = torch.zeros(start.shape[0], size, in_size, device=start.device)
    return dense.scatter_add_(2, index, weights)


def resized_crops(pixels: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Cut `n` boxes per image from `pixels (B, C, H, W)` and resize each to `size` x `size`.

    `boxes (n*B, 4)` are `(top, left, height, width)`, crop-major (row `c * B + b` is a box of
    image `b`); `flip (n*B,)` mirrors a crop horizontally. Returns `(n*B, C, size, size)`, equal to
    `TF.resized_crop(pixels[b], *box, [size, size], BICUBIC, antialias=True)` (then flipped) for
    each row, clamped to [0, 1] as the uint8 path of the CPU transform saturates.
    """
    batch, channels, height, width = pixels.shape
    rows = boxes.shape[0]
    n = rows // batch
    wy = resize_weights(boxes[:, 0], boxes[:, 2], size, height)  # (n*B, size, H)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], size, width)  # (n*B, size, W)
    wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    # Columns first, for all n crops of an image in one product: (B, C*H, W) @ (B, W, n*size).
    wx = wx.view(n, batch, size, width).permute(1, 3, 0, 2).reshape(batch, width, n * size)
    cols = pixels.reshape(batch, channels * height, width) @ wx  # (B, C*H, n*size)
    cols = cols.view(batch, channels, height, n, size).permute(3, 0, 1, 2, 4)  # (n, B, C, H, size)
    out = wy.view(n, batch, 1, size, height) @ cols  # (n, B, C, size, size)
    return out.reshape(rows, channels, size, size).clamp_(0, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601-2, as PIL) of float RGB `x (R, 3, H, W)`: `(R, 1, H, W)`."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the HSV hue of `x (R, 3, H, W)` by `shift (R,)` turns, as `multicrop.adjust_hue`."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value = torch.maximum(torch.maximum(r, g), b)  # (R, 1, H, W)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, 1.0)
    hue = torch.where(r == value, (g - b) / safe, torch.where(g == value, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = hue + 6 * shift.view(-1, 1, 1, 1)  # in sixths of a turn
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + hue, 6)  # (R, 3, H, W)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with a per-row random order, for the rows where `apply (R,)`.

    `x (R, 3, H, W)` in [0, 1]; `factors (R, 4)` brightness, contrast, saturation factors and hue
    shift; `order (R, 4)` the operation at each position. Brightness, contrast and saturation are
    the blend `clamp(f x + (1 - f) target)` with target 0, the crop's mean luma and the pixel's luma.
    """
    for position in range(4):
        op = torch.where(apply, order[:, position], torch.full_like(order[:, position], -1))  # (R,), -1: none
        factor = factors.gather(1, op.clamp(min=0).view(-1, 1)).squeeze(1)
        blend = torch.where((op >= 0) & (op <= 2), factor, 1.0).view(-1, 1, 1, 1)
        luma = grayscale(x)  # (R, 1, H, W)
        target = torch.where((op == 1).view(-1, 1, 1, 1), luma.mean(dim=(2, 3), keepdim=True), luma)
        target = torch.where((op == 0).view(-1, 1, 1, 1), 0.0, target)
        blended = (blend * x + (1 - blend) * target).clamp_(0, 1)
        x = blended  # rows without a blend here have f = 1: unchanged
        # Hue only on the rows that take it here: one gather and one scatter.
        rows_hue = (op == 3).nonzero().squeeze(1)
        if rows_hue.numel():
            x.index_copy_(0, rows_hue, adjust_hue(x.index_select(0, rows_hue), factors[rows_hue, 3]))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of `x (R, C, H, W)` with a standard deviation `sigma (R,)` per row.

    Row r uses the kernel of torchvision's gaussian_blur (radius ceil(3 sigma), weights
    exp(-t^2 / 2 sigma^2) normalised), with reflect padding. All rows share one padding of
    ceil(3 max_sigma) and one depthwise convolution: reflected pixels do not depend on the pad
    width, so the zero taps beyond a row's own radius give torchvision's result.
    """
    rows, channels, height, width = x.shape
    radius = math.ceil(3 * max_sigma)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)  # (K,)
    sigma = sigma.view(-1, 1)  # (R, 1)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2) * (t.abs() <= torch.ceil(3 * sigma))  # (R, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (R*C, K): one kernel per channel of a row
    padded = F.pad(x.reshape(1, rows * channels, height, width), (radius,) * 4, mode="reflect")
    out = F.conv2d(padded, kernel.view(-1, 1, 1, 2 * radius + 1), groups=rows * channels)  # along rows
    out = F.conv2d(out, kernel.view(-1, 1, 2 * radius + 1, 1), groups=rows * channels)  # along columns
    return out.view(rows, channels, height, width)


__all__ = ["BatchCropParams", "BatchMultiCrop", "DecodeAndCap", "resize_weights", "resized_crops"]
