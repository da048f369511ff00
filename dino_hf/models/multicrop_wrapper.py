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

    def forward(
        self, crops: list[torch.Tensor] | torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs of all crops, and optionally the backbone features they came from.

        Args:
            crops (`list[torch.Tensor]` or `torch.Tensor`): crops `(B, 3, H_i, W_i)` (for DINO: global 1,
                global 2, local 1, ...); a single tensor is one crop.
            return_features (`bool`, defaults to `False`): also return the backbone features (the
                features KoLeo regularises, DINOv2's CLS token before the head).

        Returns:
            `logits (len(crops) * B, K)`, rows in crop order [crop 1 batch, crop 2 batch, ...]; with
            `return_features`, the pair `(logits, features (len(crops) * B, D))` in the same row order.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        # Grouped on the host from the shapes alone: no tensor is read back from the device.
        features = torch.cat(
            [
                self.backbone(torch.cat(list(group)))  # (count * B, D)
                for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1])
            ]
        )  # (len(crops) * B, D)
        logits = self.head(features)  # (len(crops) * B, K)
        return (logits, features) if return_features else logits


__all__ = ["MultiCropWrapper"]
