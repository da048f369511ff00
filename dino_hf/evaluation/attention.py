"""DINO's attention maps (paper Fig. 1 and 3; reference visualize_attention.py): the last block's
self-attention of the CLS query over the patches, per head, and the masks that keep the patches
holding 60 % of that attention mass."""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image
from torchvision import transforms

from ..models.normalization import IMAGENET, Normalization
from .feature_models import FeatureModel

# The paper's masks keep the patches holding 60 % of the CLS attention mass (Fig. 3).
MASK_THRESHOLD = 0.6


@torch.inference_mode()
def attention_maps(model: FeatureModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last block's attention of the CLS query over the patches, per head: pixel_values
    (B, 3, H, W) -> (B, heads, H / p, W / p)."""
    batch, _, height, width = pixel_values.shape
    attention = model.last_selfattention(pixel_values)  # (B, heads, P + N, P + N)
    cls_attention = attention[:, :, 0, model.num_prefix_tokens :]  # (B, heads, N)
    return cls_attention.reshape(batch, -1, height // model.patch_size, width // model.patch_size)


def attention_masks(attention: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Boolean masks (..., h, w) of the smallest set of patches holding `threshold` of each map's mass:
    sort ascending, keep the patches whose cumulative normalised mass exceeds 1 - threshold."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold is the fraction of attention mass to keep, in (0, 1]; got {threshold}")
    flat = attention.flatten(-2)  # (..., h * w)
    values, order = flat.sort(dim=-1)
    mass = values.cumsum(dim=-1) / values.sum(dim=-1, keepdim=True)
    keep = torch.empty_like(mass, dtype=torch.bool).scatter_(-1, order, mass > 1 - threshold)
    return keep.reshape(attention.shape)


@torch.inference_mode()
def attention_foreground_iou(
    model: FeatureModel, batches, threshold: float = MASK_THRESHOLD, ignore_index: int = 255
) -> float:
    """How well the attention masks find the objects (the paper's Jaccard of its Sec. 5, without a probe):
    the mean over images of the IoU (%) between a mask's foreground (class > 0) and the patches holding
    `threshold` of the last block's CLS attention mass, the heads' maps averaged, upsampled (nearest) to
    the mask. `batches` yields `(pixel_values (B, 3, S, S), masks (B, S, S))` (`dense.SegmentationBatches`);
    `ignore_index` pixels count for nothing; an image with neither foreground nor mask is skipped."""
    device = next(model.parameters()).device
    scores = []
    for pixel_values, masks in batches:
        maps = attention_maps(model, pixel_values.to(device)).float().mean(dim=1)  # (B, h, w)
        keep = F.interpolate(attention_masks(maps, threshold)[:, None].float(), size=masks.shape[-2:])
        valid = masks != ignore_index
        keep, foreground = keep[:, 0].bool().cpu() & valid, (masks > 0) & valid
        intersection = (keep & foreground).flatten(1).sum(1)
        union = (keep | foreground).flatten(1).sum(1)
        scores += (intersection[union > 0] / union[union > 0]).tolist()
    if not scores:
        raise ValueError("no image to score: every mask is empty or ignored")
    return 100.0 * sum(scores) / len(scores)


def model_input(
    image: Image.Image, image_size: int, patch_size: int, normalization: Normalization = IMAGENET
) -> torch.Tensor:
    """(1, 3, H', W'): the image resized (bicubic) so that its short side is about `image_size` and both
    sides are multiples of the patch size, normalised with `normalization` (the model's own,
    `FeatureModel.normalization`; ImageNet's by default)."""
    width, height = image.size
    scale = image_size / min(width, height)
    resized = tuple(max(patch_size, round(side * scale / patch_size) * patch_size) for side in (width, height))
    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(normalization.mean, normalization.std)]
    )
    return to_tensor(image.convert("RGB").resize(resized, Image.BICUBIC)).unsqueeze(0)


# viridis at 0, 1/4, 1/2, 3/4, 1 (the reference saves its maps with matplotlib's default colormap).
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def _colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 viridis."""
    position = values * (len(_VIRIDIS) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(_VIRIDIS) - 2)
    fraction = (position - low)[..., None]
    return ((1 - fraction) * _VIRIDIS[low] + fraction * _VIRIDIS[low + 1]).astype(np.uint8)


def save_attention_maps(
    model: FeatureModel,
    image: Image.Image,
    output_dir: "str | os.PathLike",
    image_size: int = 480,
    threshold: float = MASK_THRESHOLD,
    device=None,
) -> list[Path]:
    """Write `attn-head{j}.png` (heat map blended over the image) and `mask-head{j}.png` (white where
    the patch is kept by `attention_masks`), at the image's own size.

    The image is resized by `model_input`: its short side about `image_size`, both sides multiples of
    the patch size (the reference visualises at 480 px), normalised with the model's own mean and std
    (`model.normalization`); the maps are upsampled back bilinearly, the
    masks by nearest neighbour, and each heat map is scaled to its own min / max as matplotlib does.
    """
    if not model.has_tokens:
        raise ValueError("attention maps need a ViT; this backbone has no attention over patches")
    device = PartialState().device if device is None else device
    image = image.convert("RGB")
    width, height = image.size
    pixel_values = model_input(image, image_size, model.patch_size, model.normalization).to(device)
    maps = attention_maps(model.to(device), pixel_values)[0].float()  # (heads, h, w)
    masks = attention_masks(maps, threshold).float()  # (heads, h, w)
    heat = F.interpolate(maps[None], size=(height, width), mode="bilinear", align_corners=False)[0]  # (heads, H, W)
    masks = F.interpolate(masks[None], size=(height, width), mode="nearest")[0]  # (heads, H, W)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(image, dtype=np.float32)
    written = []
    for head in range(maps.shape[0]):
        values = heat[head].cpu().numpy()
        values = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
        blended = 0.5 * pixels + 0.5 * _colorize(values)
        written.append(output_dir / f"attn-head{head}.png")
        Image.fromarray(blended.astype(np.uint8)).save(written[-1])
        written.append(output_dir / f"mask-head{head}.png")
        Image.fromarray((masks[head].cpu().numpy() * 255).astype(np.uint8)).save(written[-1])  # mode L
    return written


__all__ = [
    "MASK_THRESHOLD",
    "attention_foreground_iou",
    "attention_maps",
    "attention_masks",
    "model_input",
    "save_attention_maps",
]
