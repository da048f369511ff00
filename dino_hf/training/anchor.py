"""Anchoring the student to its starting weights, for continued pretraining from trained backbones.

Two terms against the anchor, a frozen copy of the student's backbone taken before the first step
(docs/recipe.md#anchoring-to-the-start):

- Gram anchoring (DINOv3, Simeoni et al. 2025, Sec. 4 "Gram anchoring"; reference
  `dinov3/loss/gram_loss.py: GramLoss` with `img_level=True`): the patch-to-patch similarities of the
  student's global-crop patch tokens are kept close to those of the "Gram teacher". DINOv3 takes its
  Gram teacher from an earlier EMA teacher; for continued pretraining the starting weights themselves
  are the natural one, and that is the anchor here.
- A cosine term on the global feature: 1 - cos(student feature, anchor feature) of each global crop.

The anchor sees the 2 global crops only, without gradient: one extra forward of the global crops per
step and one backbone's weights in memory.
"""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .arguments import DinoTrainingArguments

# The names of the terms in a step's metrics.
GRAM, COSINE = "gram", "anchor_cos"


def gram_loss(
    student_patch_tokens: torch.Tensor, anchor_patch_tokens: torch.Tensor, remove_neg: bool = False
) -> torch.Tensor:
    """DINOv3's Gram loss at image level, in float32 with autocast off.

    For each crop, with X_S and X_G the L2-normalised patch tokens (P x d) of the student and of the
    anchor, the Gram matrices are G_S = X_S X_S^T and G_G = X_G X_G^T (P x P); the crop's loss is the
    mean of (G_S - G_G)^2 over the P x P entries, and the loss is the mean over the crops.

    Args:
        student_patch_tokens (`torch.Tensor` of shape `(N, P, C)`): the student's patch tokens of N crops.
        anchor_patch_tokens (`torch.Tensor` of shape `(N, P, C')`): the anchor's, of the same crops.
        remove_neg (`bool`, defaults to `False`): set the negative entries of both Gram matrices to 0
            before the difference (the reference's `remove_neg`).

    Returns:
        The scalar loss (0-dim tensor).
    """
    if student_patch_tokens.ndim != 3 or student_patch_tokens.shape[:2] != anchor_patch_tokens.shape[:2]:
        raise ValueError(
            f"gram_loss takes patch tokens (N, P, C) of the same N crops and P patches from the student and the "
            f"anchor, got {tuple(student_patch_tokens.shape)} and {tuple(anchor_patch_tokens.shape)}"
        )
    dtype = torch.promote_types(student_patch_tokens.dtype, torch.float32)
    with torch.autocast(device_type=student_patch_tokens.device.type, enabled=False):
        grams = []
        for tokens in (student_patch_tokens, anchor_patch_tokens):
            x = F.normalize(tokens.to(dtype), dim=-1)  # (N, P, C)
            gram = x @ x.transpose(1, 2)  # (N, P, P)
            grams.append(gram.clamp(min=0.0) if remove_neg else gram)
        # Every crop has P x P entries: the mean over all of them is the mean over crops of each crop's mean.
        return (grams[0] - grams[1]).square().mean()


def anchor_cosine_loss(student_features: torch.Tensor, anchor_features: torch.Tensor) -> torch.Tensor:
    """1 - cos(student feature, anchor feature), averaged over the rows (the global crops of the batch),
    in float32 with autocast off.

    Args:
        student_features, anchor_features (`torch.Tensor` of shape `(N, D)`): the backbone features of
            the same N crops.

    Returns:
        The scalar loss (0-dim tensor), in [0, 2].
    """
    if student_features.ndim != 2 or student_features.shape != anchor_features.shape:
        raise ValueError(
            f"anchor_cosine_loss takes features (N, D) of the same crops from the student and the anchor, got "
            f"{tuple(student_features.shape)} and {tuple(anchor_features.shape)}"
        )
    dtype = torch.promote_types(student_features.dtype, torch.float32)
    with torch.autocast(device_type=student_features.device.type, enabled=False):
        cosine = F.cosine_similarity(student_features.to(dtype), anchor_features.to(dtype), dim=-1)  # (N,)
        return 1.0 - cosine.mean()


def gram_weight_at(step: int, warmup_steps: int, weight: float) -> float:
    """The Gram loss weight at `step`: `weight * min(1, step / warmup_steps)`, a linear ramp from 0 at
    step 0 to `weight` at step `warmup_steps` (`weight` from the first step when `warmup_steps` is 0)."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if step >= warmup_steps:
        return weight
    return weight * step / warmup_steps


class Anchor(nn.Module):
    """The frozen starting backbone and the terms that anchor the student to it.

    The copy has no gradients, no optimiser state and stays in eval mode whatever `train()` asks (no
    stochastic depth; a BatchNorm uses the running statistics the start came with).

    Args:
        backbone (`nn.Module`): the student's backbone before the first step (a `TimmBackbone`, a
            `DinoModelBackbone`, or any module with `forward_tokens`); it is copied.
        gram (`bool`): compute the Gram loss (`gram_loss`).
        cosine (`bool`): compute the cosine term (`anchor_cosine_loss`).
        remove_neg (`bool`, defaults to `False`): the Gram loss's `remove_neg`.
    """

    def __init__(self, backbone: nn.Module, *, gram: bool, cosine: bool, remove_neg: bool = False):
        super().__init__()
        if not (gram or cosine):
            raise ValueError("an Anchor computes the Gram loss, the cosine term or both: set gram or cosine")
        if not hasattr(backbone, "forward_tokens"):
            raise TypeError(
                f"the anchor needs a backbone with forward_tokens (patch tokens), got {type(backbone).__name__}; "
                "build it with dino_hf.models.backbones.build_backbone"
            )
        self.backbone = copy.deepcopy(backbone)
        self.backbone.requires_grad_(False)
        self.gram, self.cosine, self.remove_neg = gram, cosine, remove_neg
        self.eval()

    @property
    def term_names(self) -> tuple[str, ...]:
        """The metrics the terms are logged as, in the order they are added to the objective."""
        return (GRAM,) * self.gram + (COSINE,) * self.cosine

    def train(self, mode: bool = True) -> "Anchor":
        """Always eval mode: the anchor is the fixed start."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`global_crops (N, 3, G, G)` -> the anchor's `(features (N, D), patch_tokens (N, P, C))`."""
        return self.backbone.forward_tokens(global_crops)

    def terms(
        self, global_crops: torch.Tensor, features: torch.Tensor, patch_tokens: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The anchoring terms of the student's outputs on `global_crops`, before weighting.

        Args:
            global_crops (`torch.Tensor` of shape `(N, 3, G, G)`): the global crops, concatenated in
                crop order (N = 2B for DINO).
            features (`torch.Tensor` of shape `(N, D)`): the student's backbone features of those crops.
            patch_tokens (`torch.Tensor` of shape `(N, P, C)`): the student's patch tokens of those crops;
                read only when `gram` is on.

        Returns:
            `{"gram": ..., "anchor_cos": ...}`, the terms that are on (0-dim tensors).
        """
        anchor_features, anchor_patch_tokens = self(global_crops)  # (N, D), (N, P, C)
        terms = {}
        if self.gram:
            terms[GRAM] = gram_loss(patch_tokens, anchor_patch_tokens, self.remove_neg)
        if self.cosine:
            terms[COSINE] = anchor_cosine_loss(features, anchor_features)
        return terms


def build_anchor(args: DinoTrainingArguments, backbone: nn.Module) -> Anchor | None:
    """The run's anchor, a copy of `backbone` as it is now (before the first step), or None when
    `--gram_loss_weight` and `--anchor_cosine_weight` are both 0."""
    if not (args.gram_loss_weight or args.anchor_cosine_weight):
        return None
    return Anchor(
        backbone,
        gram=args.gram_loss_weight > 0,
        cosine=args.anchor_cosine_weight > 0,
        remove_neg=args.gram_remove_neg,
    )


__all__ = ["COSINE", "GRAM", "Anchor", "anchor_cosine_loss", "build_anchor", "gram_loss", "gram_weight_at"]
