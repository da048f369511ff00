"""The PCA picture of patch features (DINOv2, Oquab et al. 2023, Fig. 1 and "PCA of patch features"
in its qualitative results): the first three principal components of the foreground patches of a few
images, as RGB.

As DINOv2: a first PCA over all the patches of all the images; the patches whose first component is
above a threshold are the foreground; a second PCA over the foreground patches only, whose first
three components, each scaled to [0, 1] over all the images, are the red, green and blue of each
foreground patch. The background is black.

The sign of a principal component is arbitrary. The first one's is chosen so that the foreground is
positive: objects sit inside the frame and the background reaches its edges, so the sign is the one
that gives the patches of the grid's outer ring a lower mean score than the inner patches. The other
components take the sign that makes their largest loading positive (scikit-learn's `svd_flip`), so
that a run gives the same colours every time.
"""

import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image

from .attention import model_input
from .dense import patch_features, require_patch_tokens
from .feature_models import FeatureModel

# DINOv2 keeps "the patches with a positive value" of the first component; here in units of its std.
FOREGROUND_THRESHOLD = 0.0


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean (D,), components (k, D))` of the rows of x (N, D), in float64; each component has the
    sign that makes its largest-magnitude loading positive."""
    x = x.double()
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)  # vh (min(N, D), D)
    components = vh[:k]
    signs = components.gather(1, components.abs().argmax(dim=1, keepdim=True)).sign()  # (k, 1)
    return mean, components * signs


def _outer_ring(height: int, width: int) -> torch.Tensor:
    ring = torch.ones(height, width, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    return ring.flatten()  # (h * w,)


def foreground_pca(
    features: list[torch.Tensor], threshold: float = FOREGROUND_THRESHOLD
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The PCA maps of the module docstring for a few images at once.

    Args:
        features: per image, its patch features (D, h, w) (sizes may differ).
        threshold: foreground where the first component, divided by its standard deviation over all
            patches, exceeds this (0: the positive side, as DINOv2).

    Returns:
        per image, `(rgb (h, w, 3) in [0, 1], foreground (h, w) bool)`.
    """
    grids = [tuple(f.shape[1:]) for f in features]
    tokens = torch.cat([f.flatten(1).T for f in features]).double()  # (N, D), all images' patches
    if tokens.shape[1] < 3:
        raise ValueError(f"the PCA picture needs 3 components; the features have {tokens.shape[1]} dimensions")
    mean, first = principal_components(tokens, 1)
    score = (tokens - mean) @ first[0]  # (N,)
    score = score / score.std().clamp(min=1e-12)
    ring = torch.cat([_outer_ring(*grid) for grid in grids])
    if ring.any() and (~ring).any() and score[ring].mean() > score[~ring].mean():
        score = -score  # the background, at the frame's edges, on the negative side
    foreground = score > threshold
    if foreground.sum() < 3:
        raise ValueError(
            f"{int(foreground.sum())} of {len(score)} patches are above the threshold {threshold}: the second "
            "PCA needs at least 3; lower the threshold"
        )
    mean, components = principal_components(tokens[foreground], 3)
    projected = (tokens[foreground] - mean) @ components.T  # (F, 3)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    rgb = torch.zeros(len(tokens), 3, dtype=torch.float64)
    rgb[foreground] = (projected - low) / (high - low).clamp(min=1e-12)
    sizes = [h * w for h, w in grids]
    return [
        (colours.reshape(h, w, 3).float(), mask.reshape(h, w))
        for colours, mask, (h, w) in zip(rgb.split(sizes), foreground.split(sizes), grids)
    ]


@torch.inference_mode()
def save_pca_maps(
    model: FeatureModel,
    images: list[tuple[str, Image.Image]],
    output_dir: "str | os.PathLike",
    image_size: int = 224,
    threshold: float = FOREGROUND_THRESHOLD,
    device=None,
) -> list[Path]:
    """Write `pca-<name>.png` for each `(name, image)`: the image, and on its right its PCA map
    (`foreground_pca` over all the images together) upsampled by nearest neighbour to the image's
    size. Images are fed at a short side of about `image_size`, normalised with the model's own mean and std
    (see `dino_hf.evaluation.attention.model_input`)."""
    require_patch_tokens(model, "the PCA of patch features")
    device = PartialState().device if device is None else device
    model.to(device).eval()
    inputs = [model_input(image, image_size, model.patch_size, model.normalization) for _, image in images]
    features = [patch_features(model, pixels.to(device))[0].float().cpu() for pixels in inputs]  # per image (D, h, w)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (name, image), (rgb, _) in zip(images, foreground_pca(features, threshold)):
        image = image.convert("RGB")
        pca_map = Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8)).resize(image.size, Image.NEAREST)
        canvas = Image.new("RGB", (2 * image.width, image.height))
        canvas.paste(image, (0, 0))
        canvas.paste(pca_map, (image.width, 0))
        path = output_dir / f"pca-{name}.png"
        if path in written:  # two images of the same name
            path = output_dir / f"pca-{name}-{len(written)}.png"
        canvas.save(path)
        written.append(path)
    return written


__all__ = ["FOREGROUND_THRESHOLD", "foreground_pca", "principal_components", "save_pca_maps"]
