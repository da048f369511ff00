"""The student's projectors of feature distillation: its widths to the frozen model's.

A student distilled from a frozen foundation model (`dino_hf.objectives.distillation`) has other widths
than the model it learns from: a ResNet-18 pools 512 channels where a DINOv2 ViT-S gives 384. One
projector maps the pooled feature, another each patch token (a CNN's last feature map, flattened), to
the frozen model's width, as LightlyTrain's distillation does. Both train with the student and are
left out of its export.
"""

import torch
from torch import nn


def _projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    """`Linear(in_dim, out_dim)`, or AM-RADIO's adaptor: Linear, LayerNorm, GELU, Linear."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"projector kind {kind!r} is unknown; use 'linear' or 'mlp'")


class DistillProjector(nn.Module):
    """Projectors of the student's global feature and of its patch tokens to the frozen model's width.

    Args:
        feature_dim: width of the student's pooled feature (`backbone.num_features`).
        patch_dim: width of its patch tokens (a ViT's hidden size; a CNN's last feature map channels).
        target_dim: width of the frozen model's features.
        kind: `"linear"` (LightlyTrain, the default) or `"mlp"` (AM-RADIO's adaptor).
    """

    def __init__(self, feature_dim: int, patch_dim: int, target_dim: int, kind: str = "linear"):
        super().__init__()
        self.global_projection = _projection(feature_dim, target_dim, kind)
        self.patch_projection = _projection(patch_dim, target_dim, kind)

    def forward(self, features: torch.Tensor, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features (B, D_s)`, `patch_tokens (B, P, C_s)` -> `(B, D_t)`, `(B, P, D_t)`."""
        return self.global_projection(features), self.patch_projection(patch_tokens)


__all__ = ["DistillProjector"]
