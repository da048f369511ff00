"""The multi-crop forward of DINO's networks: backbone + head over crops of several resolutions
(the reference's `MultiCropWrapper`)."""

import itertools

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Consecutive crops of the same resolution (the same last dimension, as the reference) are
    concatenated and passed through the backbone in one call; the head then runs once on the
    features of all crops (and on iBOT's masked patch tokens in the same call, when they share it).

    Args:
        backbone (`nn.Module`): maps `(B, 3, H, W)` to features `(B, D)` (see `build_backbone`); its
            `forward_tokens` gives the same features and the patch tokens `(B, P, C)`.
        head (`nn.Module`): maps `(B, D)` to `(B, K)` (a `DinoHead`).
        ibot_head (`nn.Module`, optional): the head of the masked patch tokens (iBOT), separate from
            `head` as in DINOv3; None (the default, and DINOv2's choice) sends them through `head`.
        distill_projector (`nn.Module`, optional): the projectors of feature distillation
            (`dino_hf.models.distill_projector.DistillProjector`); None (the default) without distillation.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        ibot_head: nn.Module | None = None,
        distill_projector: nn.Module | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.ibot_head = ibot_head  # None registers nothing: the state dict is DINO's
        self.distill_projector = distill_projector

    @property
    def patch_head(self) -> nn.Module:
        """The head the patch tokens go through: `ibot_head`, or DINO's `head` when it shares it."""
        return self.ibot_head if self.ibot_head is not None else self.head

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
        bool_masked_pos: torch.Tensor | None = None,
        patch_indices: torch.Tensor | None = None,
        heads: bool = True,
        project: bool = False,
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
            bool_masked_pos (`torch.Tensor` of shape `(R, P)`, bool, optional): patches of the first R rows
                of the first group (for DINO the 2B global crops, in crop order) that the backbone replaces
                by its mask token (iBOT's student); any further rows of the group are left whole.
            patch_indices (`torch.Tensor` of shape `(M,)`, int64, optional): rows of the first group's
                patch tokens flattened to `(count * B * P, C)` to send through `patch_head` (the masked
                patches, `PatchMasks.indices`).
            heads (`bool`, defaults to `True`): run the DINO head; False leaves the logits out of the outputs
                (a distillation run without the DINO loss).
            project (`bool`, defaults to `False`): also return the `distill_projector`'s outputs of the first
                crop's B rows, from the same backbone call: `(B, D_t)` and `(B, P, D_t)`.

        Returns:
            `logits (len(crops) * B, K)`, rows in crop order [crop 1 batch, crop 2 batch, ...]; with
            `return_features`, also `features (len(crops) * B, D)` in the same row order; with
            `return_patch_tokens`, `patch_tokens (count * B, P, C)` of the `count` crops of the first
            group (2 for DINO's crops), rows in crop order; with `patch_indices`, last,
            `patch_logits (M, K)`, the patch head's outputs of those rows; with `project`, last, the
            `distill_projector`'s output for the first crop: the pair `(B, D_t)`, `(B, P, D_t)`, or one pair per
            frozen model (`DistillHeads`). Without `heads`, the logits are left out.
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        # Grouped on the host from the shapes alone: no tensor is read back from the device.
        groups = [torch.cat(list(group)) for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1])]
        patch_tokens = None
        if return_patch_tokens or project or bool_masked_pos is not None or patch_indices is not None:
            masking = {} if bool_masked_pos is None else {"bool_masked_pos": _cover(bool_masked_pos, len(groups[0]))}
            # (count * B, D), (count * B, P, C)
            first, patch_tokens = self.backbone.forward_tokens(groups[0], **masking)
            features = torch.cat([first, *(self.backbone(group) for group in groups[1:])])  # (len(crops) * B, D)
        else:
            features = torch.cat([self.backbone(group) for group in groups])  # (len(crops) * B, D)
        patch_logits = logits = None
        if heads and patch_indices is None:
            logits = self.head(features)  # (len(crops) * B, K)
        elif heads:
            rows = patch_tokens.flatten(0, 1).index_select(0, patch_indices)  # (M, C): a fixed shape, no host read
            if self._patches_join_head_call:  # one call for both: the prototypes are normalised once
                logits, patch_logits = self.head(torch.cat([features, rows])).split([len(features), len(rows)])
            else:
                logits, patch_logits = self.head(features), self.patch_head(rows)  # (len(crops) * B, K), (M, K)
        outputs = (logits,) if heads else ()
        if return_features:
            outputs += (features,)
        if return_patch_tokens:
            outputs += (patch_tokens,)
        if patch_logits is not None:
            outputs += (patch_logits,)
        if project:
            rows = len(crops[0])  # (B, D_t), (B, P, D_t)
            outputs += (self.distill_projector(features[:rows], patch_tokens[:rows]),)
        return outputs if len(outputs) > 1 else outputs[0]

    @property
    def _patches_join_head_call(self) -> bool:
        """Whether the masked patch tokens go through DINO's head in the same call as the features
        (DINOv2's shared head): not with a separate head, nor with BatchNorm in the head, whose batch
        statistics would then mix the two."""
        return self.ibot_head is None and not any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) for module in self.head.modules()
        )


def _cover(bool_masked_pos: torch.Tensor, rows: int) -> torch.Tensor:
    """`bool_masked_pos (R, P)` extended with unmasked rows to the `rows` crops of a backbone call (local
    crops of the global crops' size join their call)."""
    if len(bool_masked_pos) == rows:
        return bool_masked_pos
    whole = bool_masked_pos.new_zeros((rows - len(bool_masked_pos), bool_masked_pos.shape[1]))
    return torch.cat([bool_masked_pos, whole])  # (rows, P)


__all__ = ["MultiCropWrapper"]
