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
        backbone (`nn.Module`): maps `(B, 3, H, W)` to features `(B, D)` (see `build_backbone`); its
            `forward_tokens` gives the same features and the patch tokens `(B, P, C)`.
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
        self,
        crops: list[torch.Tensor] | torch.Tensor,
        return_features: bool = False,
        return_patch_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Head outputs of all crops, and optionally the backbone features and patch tokens they came from.

        Args:
            crops (`list[torch.Tensor]` or `torch.Tensor`): crops `(B, 3, H_i, W_i)` (for DINO: global 1,
                global 2, local 1, ...); a single tensor is one crop.
            return_features (`bool`, defaults to `False`): also return the backbone features (the
                features KoLeo regularises, DINOv2's CLS token before the head).
            return_patch_tokens (`bool`, defaults to `False`): also return the patch tokens of the first
                group of crops (for DINO the 2 global crops), taken from the same backbone call as their
                features (the backbone's `forward_tokens`): what Gram anchoring compares.

        Returns:
            `logits (len(crops) * B, K)`, rows in crop order [crop 1 batch, crop 2 batch, ...]; with
            `return_features`, also `features (len(crops) * B, D)` in the same row order; with
            `return_patch_tokens`, last, `patch_tokens (count * B, P, C)` of the `count` crops of the first
            group (2 for DINO's crops), rows in crop order.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        # Grouped on the host from the shapes alone: no tensor is read back from the device.
        groups = [torch.cat(list(group)) for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        patch_tokens = None
        if return_patch_tokens:
            first, patch_tokens = self.backbone.forward_tokens(groups[0])  # (count * B, D), (count * B, P, C)
            features = torch.cat([first, *(self.backbone(group) for group in groups[1:])])  # (len(crops) * B, D)
        else:
            features = torch.cat([self.backbone(group) for group in groups])  # (len(crops) * B, D)
        logits = self.head(features)  # (len(crops) * B, K)
        outputs = (logits, features) if return_features else (logits,)
        if return_patch_tokens:
            outputs += (patch_tokens,)
        return outputs if len(outputs) > 1 else logits


__all__ = ["MultiCropWrapper"]
