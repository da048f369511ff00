"""Gram anchoring (DINOv3) and anchoring to the start: a frozen backbone the student is held to.

DINOv3's Gram loss (Simeoni et al. 2025, Sec. 4 "Gram anchoring"; reference
`dinov3/loss/gram_loss.py: GramLoss` with `img_level=True`) keeps the patch-to-patch similarities of
the student's global-crop patch tokens close to those of a frozen "Gram teacher", the `Anchor` here
(docs/recipe.md#anchoring-to-the-start). Two Gram teachers:

- `start`: a copy of the student's backbone taken before the first step, the natural Gram teacher for
  continued pretraining; a cosine term on the global feature (`anchor_cosine_loss`) may anchor to it too.
- `ema`: DINOv3's own, a snapshot of the EMA teacher's backbone taken at a step and refreshed on a
  schedule (`GramSnapshots`, docs/recipe.md#ema-and-high-resolution-gram-teachers); before the first
  snapshot the Gram loss is off.

The Gram teacher may see the global crops at a higher resolution (DINOv3's high-resolution Gram
teacher, `resolution_scale`); its patch-token map is then resized (bicubic) to the student's grid.
It sees the 2 global crops only, without gradient: one extra forward of the global crops per step
and one backbone's weights in memory.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from ..models.lora import remove_adapters_, setup_of, shared_parameters
from .term import StudentOutputs, Term

# The names of the terms in a step's metrics.
GRAM, COSINE = "gram", "anchor_cos"
# The anchor's state-dict key of the step its weights were taken at (-1: not taken yet).
SNAPSHOT_STEP = "snapshot_step"


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


def gram_weight_at(step: int, warmup_steps: int, weight: float, start_step: int = 0) -> float:
    """The Gram loss weight at `step`: 0 before `start_step` (the first snapshot of an EMA Gram teacher;
    0 for the start), then `weight * min(1, (step - start_step) / warmup_steps)`, a linear ramp from 0 at
    `start_step` to `weight` `warmup_steps` later (`weight` at once when `warmup_steps` is 0)."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if step < start_step:
        return 0.0
    step -= start_step
    if step >= warmup_steps:
        return weight
    return weight * step / warmup_steps


@dataclass(frozen=True)
class GramSnapshots:
    """When an EMA Gram teacher is taken: first before step `start` runs (once `start` steps are done),
    then every `every` steps (0: never again), at most `max_updates` times after the first (None: no
    limit). DINOv3 (`gram.it_first_update`, `update_frequency`, `max_updates`): the 7B run's Gram phase
    starts at 1M iterations, refreshes every 10k, at most 3 times. A pure function of the step, as the
    reference's (`train.py` counts the refreshes of a resumed run from its start iteration)."""

    start: int
    every: int = 0
    max_updates: int | None = None

    def due(self, step: int) -> bool:
        """Whether a snapshot of the EMA teacher is taken before `step` runs."""
        if step < self.start:
            return False
        offset = step - self.start
        if offset == 0:
            return True
        if not self.every or offset % self.every:
            return False
        return self.max_updates is None or offset // self.every <= self.max_updates

    def last(self, step: int) -> int | None:
        """The step of the snapshot that `step` trains against (the last one taken at or before it), or
        None before the first."""
        if step < self.start:
            return None
        if not self.every:
            return self.start
        updates = (step - self.start) // self.every
        if self.max_updates is not None:
            updates = min(updates, self.max_updates)
        return self.start + updates * self.every

    def held(self, steps_done: int) -> int | None:
        """The step of the snapshot a checkpoint written after `steps_done` steps holds: taken before one
        of those steps (a snapshot due at step `steps_done` is taken after the checkpoint), or None."""
        return self.last(steps_done - 1) if steps_done > 0 else None


def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of a map of `num_tokens` patch tokens of a `height x width` image: rows /
    columns as height / width (a ViT's patch grid, a CNN's final feature map)."""
    rows = max(1, round(math.sqrt(num_tokens * height / width)))
    columns = num_tokens // rows
    if rows * columns != num_tokens:
        raise ValueError(
            f"{num_tokens} patch tokens of a {height} x {width} image do not form a grid of the image's shape; "
            "the Gram teacher's token map cannot be resized to the student's"
        )
    return rows, columns


def resize_token_map(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch tokens `(N, h * w, C)` of a `grid` (h, w), row by row, resized (bicubic, in float32) to
    `size` (h', w'): `(N, h' * w', C)`, as DINOv3 resizes its high-resolution Gram teacher's patch map to
    the student's grid (`gram.global_teacher_resize_method: bicubic`, no antialias)."""
    n, _, channels = tokens.shape
    token_map = tokens.float().reshape(n, *grid, channels).permute(0, 3, 1, 2)  # (N, C, h, w)
    token_map = F.interpolate(token_map, size=size, mode="bicubic", align_corners=False)  # (N, C, h', w')
    return token_map.flatten(2).transpose(1, 2)  # (N, h' * w', C)


class Anchor(nn.Module):
    """The frozen Gram teacher (and the start the cosine term anchors to), and its terms.

    The copy has no gradients, no optimiser state and stays in eval mode whatever `train()` asks (no
    stochastic depth; a BatchNorm uses the running statistics its weights came with). Its buffer
    `snapshot_step` (saved with it) is the step its weights were taken at: 0 for the start, the step of
    the last `snapshot_` for an EMA Gram teacher, -1 before the first.

    Args:
        backbone (`nn.Module`): the student's backbone before the first step (a `TimmBackbone`, a
            `DinoModelBackbone`, or any module with `forward_tokens`); it is copied, but for the frozen base
            weights of a LoRA backbone (`dino_hf.models.lora`), which the copy shares, without the adapters.
        gram (`bool`): compute the Gram loss (`gram_loss`).
        cosine (`bool`): compute the cosine term (`anchor_cosine_loss`).
        remove_neg (`bool`, defaults to `False`): the Gram loss's `remove_neg`.
        resolution_scale (`float`, defaults to 1.0): the anchor sees the global crops resized by this
            factor (bicubic, antialiased), and its patch-token map is resized to the student's grid
            (`resize_token_map`); DINOv3's high-resolution Gram teacher uses 2. Gram loss only.
        snapshot_step (`int` or None, defaults to 0): the step `backbone`'s weights stand for: 0 for the
            start; None when they only hold the place of an EMA Gram teacher until its first `snapshot_`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        gram: bool,
        cosine: bool,
        remove_neg: bool = False,
        resolution_scale: float = 1.0,
        snapshot_step: int | None = 0,
    ):
        super().__init__()
        if not (gram or cosine):
            raise ValueError("an Anchor computes the Gram loss, the cosine term or both: set gram or cosine")
        if resolution_scale < 1 or (resolution_scale != 1 and (cosine or not gram)):
            raise ValueError(
                f"resolution_scale {resolution_scale} is not valid: a factor >= 1 of the Gram teacher's crops, "
                "with the Gram loss alone (the cosine term compares features at the student's resolution)"
            )
        if not hasattr(backbone, "forward_tokens"):
            raise TypeError(
                f"the anchor needs a backbone with forward_tokens (patch tokens), got {type(backbone).__name__}; "
                "build it with dino_hf.models.backbones.build_backbone"
            )
        setup = setup_of(backbone)
        # With LoRA the anchor is the start: the student's frozen base weights themselves (held once), its
        # adapters removed, and copies of the blocks and norms that train.
        self.backbone = copy.deepcopy(backbone, memo=shared_parameters(backbone) if setup is not None else {})
        if setup is not None:
            remove_adapters_(self.backbone.model, merge=False)
            del self.backbone.lora_setup
        self.backbone.requires_grad_(False)
        self.gram, self.cosine, self.remove_neg = gram, cosine, remove_neg
        self.resolution_scale = resolution_scale
        self.register_buffer(SNAPSHOT_STEP, torch.tensor(-1 if snapshot_step is None else snapshot_step))
        self.eval()

    @property
    def term_names(self) -> tuple[str, ...]:
        """The metrics the terms are logged as, in the order they are added to the objective."""
        return (GRAM,) * self.gram + (COSINE,) * self.cosine

    def train(self, mode: bool = True) -> "Anchor":
        """Always eval mode: the anchor is fixed between snapshots."""
        return super().train(False)

    def taken_at(self) -> int | None:
        """The step the weights were taken at (None: not yet). Reads the buffer back to the host: for
        resuming and for tests, not for the step."""
        step = int(getattr(self, SNAPSHOT_STEP))
        return None if step < 0 else step

    @torch.no_grad()
    def snapshot_(self, backbone: nn.Module, step: int) -> None:
        """Take the weights (and buffers) of `backbone`, the EMA teacher's, as the Gram teacher's of `step`.

        Under FSDP the teacher's parameters are shards: each is gathered whole (`DTensor.full_tensor`, an
        all-gather in state-dict order, so every process calls this at the same step), and every process
        holds the whole Gram teacher, as it holds the start. Nothing is read back to the host.
        """
        source, target = backbone.state_dict(), self.backbone.state_dict()
        if source.keys() != target.keys():
            raise ValueError(
                f"the Gram teacher is a copy of the student's backbone ({len(target)} tensors) and takes the EMA "
                f"teacher's backbone of the same architecture, got {len(source)} tensors of other names"
            )
        for key, value in source.items():
            target[key].copy_(value.full_tensor() if isinstance(value, DTensor) else value)
        getattr(self, SNAPSHOT_STEP).fill_(step)

    @torch.no_grad()
    def forward(self, global_crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`global_crops (N, 3, G, G)` -> the anchor's `(features (N, D), patch_tokens (N, P', C))`, of the
        crops resized by `resolution_scale` (bicubic, antialiased) when it is not 1."""
        if self.resolution_scale != 1:
            size = [round(side * self.resolution_scale) for side in global_crops.shape[-2:]]
            global_crops = F.interpolate(global_crops, size=size, mode="bicubic", antialias=True, align_corners=False)
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
        anchor_features, anchor_patch_tokens = self(global_crops)  # (N, D), (N, P', C)
        terms = {}
        if self.gram:
            if self.resolution_scale != 1:
                height, width = global_crops.shape[-2:]
                scaled = [round(side * self.resolution_scale) for side in (height, width)]
                anchor_grid = token_grid(anchor_patch_tokens.shape[1], *scaled)
                student_grid = token_grid(patch_tokens.shape[1], height, width)
                anchor_patch_tokens = resize_token_map(anchor_patch_tokens, anchor_grid, student_grid)  # (N, P, C)
            terms[GRAM] = gram_loss(patch_tokens, anchor_patch_tokens, self.remove_neg)
        if self.cosine:
            terms[COSINE] = anchor_cosine_loss(features, anchor_features)
        return terms


class AnchorTerm(Term):
    """The anchor's terms (`Anchor.term_names`: the Gram loss `gram` and the cosine term `anchor_cos`) of the 2
    global crops, each with its weight; a weight of 0 still reports its term."""

    def __init__(self, anchor: Anchor, gram_weight: float = 0.0, cosine_weight: float = 0.0):
        self.anchor = anchor
        given = {"gram": gram_weight, "anchor_cos": cosine_weight}
        for name, weight in given.items():
            if weight and name not in anchor.term_names:
                raise ValueError(
                    f"the {name} weight {weight} needs an anchor built with that term "
                    "(dino_hf.training.objectives.build_anchor, --gram_loss_weight / --anchor_cosine_weight)"
                )
        self.weights = {name: given[name] for name in anchor.term_names}

    def student_options(self) -> dict:
        return {"return_features": True, "return_patch_tokens": self.anchor.gram}

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        rows = 2 * len(outputs.crops[0])  # the global crops
        patch_tokens = outputs.patch_tokens[:rows] if outputs.patch_tokens is not None else None
        return self.anchor.terms(torch.cat(outputs.crops[:2]), outputs.features[:rows], patch_tokens)


__all__ = [
    "COSINE",
    "GRAM",
    "SNAPSHOT_STEP",
    "Anchor",
    "AnchorTerm",
    "GramSnapshots",
    "anchor_cosine_loss",
    "gram_loss",
    "gram_weight_at",
    "resize_token_map",
    "token_grid",
]
