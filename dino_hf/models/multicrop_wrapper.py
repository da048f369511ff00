"""The multi-crop forward of DINO's networks: backbone + head over crops of several resolutions
(the reference's `MultiCropWrapper`)."""

import itertools

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Consecutive crops of the same resolution (the same last dimension, as the reference) are
    concatenated and passed through the backbone in one call; the head then runs once on the
    features of all crops.

    Args:
        backbone (`nn.Module`): maps `(B, 3, H, W)` to features `(B, D)` (see `build_backbone`).
        head (`nn.Module`): maps `(B, D)` to `(B, K)` (a `DinoHead`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The backbone's blocks (a DinoModel's embeddings and layers): the units that FSDP shards
        (Accelerate's transformer-based wrap policy reads this name)."""
        names = getattr(getattr(self.backbone, "model", None), "_no_split_modules", None)
        return sorted(names) if names is not None else None

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """`crops`: list of `(B, 3, H_i, W_i)` -> `(len(crops) * B, K)`, rows in crop order
        [crop 1 batch, crop 2 batch, ...] (for DINO: global 1, global 2, local 1, ...)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        # Grouped on the host from the shapes alone: no tensor is read back from the device.
        features = [
            self.backbone(torch.cat(list(group)))  # (count * B, D)
            for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1])
        ]
        return self.head(torch.cat(features))  # (len(crops) * B, K)


__all__ = ["MultiCropWrapper"]
