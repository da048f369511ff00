"""The terms a step adds to the DINO loss, each with one home.

A term names the values it adds and their weights at this step, says what it needs from the forwards
(the student's backbone features, its patch tokens, masked patches, the distillation projectors), computes
its values from what the forwards gave, and keeps its state (iBOT's patch center, the distillation
queue) with the checkpoint. `dino_hf.training.step.train_step` runs the forwards the active terms need and
adds them up; a new objective is a new term, not new arguments of the step.

The terms here: iBOT's masked-patch loss (`IBotTerm`), DINOv2's KoLeo (`KoLeoTerm`) and the anchor to the
start or to an EMA snapshot (`AnchorTerm`: the Gram loss and the cosine term); distillation from a frozen
model is `dino_hf.training.distillation.Distillation`.
"""

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from accelerate import Accelerator

from ..data.masks import PatchMasks
from .anchor import Anchor
from .ibot import IBOT, IBotLoss
from .loss import koleo_loss


class StudentOutputs(NamedTuple):
    """What one micro-batch's forwards gave the terms. `crops` as the step got them (`[global 1, global 2,
    local ...]`, or the one view of a distillation run without DINO); each of the others is None unless a
    term asked for it: the student's backbone `features (ncrops * B, D)`, the first crop group's
    `patch_tokens (2 * B, P, C)`, iBOT's `patch_logits (M, K)` of the student and `teacher_patch_logits (M, K)`
    at the masked patches, the distillation projectors' `projected` pair `((B, D_t), (B, P, D_t))`."""

    crops: list[torch.Tensor]
    teacher_temp: float
    accelerator: Accelerator | None
    features: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    patch_logits: torch.Tensor | None = None
    teacher_patch_logits: torch.Tensor | None = None
    projected: tuple | None = None


class Term(ABC):
    """A term of the objective; the defaults are those of a term that needs nothing and keeps no state."""

    weights: dict[str, float] = {}  # the values it adds, by name, and their weights at this step

    def student_options(self) -> dict:
        """What the student's forward must return for this term (`MultiCropWrapper.forward`'s options)."""
        return {}

    def teacher_options(self) -> dict:
        """What the EMA teacher's forward must return for this term."""
        return {}

    def micro_batches(self, count: int) -> list["Term"]:
        """The term for each of `count` micro-batches (iBOT splits its masks)."""
        return [self] * count

    def prepare(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The crops the networks see, from the batch's (mixup mixes them); the same by default."""
        return crops

    @abstractmethod
    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        """The term's values before weighting, by name."""

    def after_step(self, skip: torch.Tensor) -> None:
        """What changes once per optimisation step, after the loss (a center), unless `skip` is set."""


class KoLeoTerm(Term):
    """DINOv2's KoLeo regulariser of each global crop's backbone features, summed over the 2 crops."""

    def __init__(self, weight: float):
        self.weights = {"koleo": weight}

    def student_options(self) -> dict:
        return {"return_features": True}

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        global_features = outputs.features[: 2 * len(outputs.crops[0])]  # (2 * B, D), as DINOv2's CLS tokens
        return {"koleo": sum(koleo_loss(crop_features) for crop_features in global_features.chunk(2))}


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
                    "(dino_hf.training.anchor.build_anchor, --gram_loss_weight / --anchor_cosine_weight)"
                )
        self.weights = {name: given[name] for name in anchor.term_names}

    def student_options(self) -> dict:
        return {"return_features": True, "return_patch_tokens": self.anchor.gram}

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        rows = 2 * len(outputs.crops[0])  # the global crops
        patch_tokens = outputs.patch_tokens[:rows] if outputs.patch_tokens is not None else None
        return self.anchor.terms(torch.cat(outputs.crops[:2]), outputs.features[:rows], patch_tokens)


class IBotTerm(Term):
    """iBOT's masked-patch loss: the student sees the global crops masked, the teacher whole; the patch head's
    outputs at the masked patches are scored as DINO scores the CLS token, against the patch center, which
    moves once per step with the teacher's outputs of every micro-batch.

    Args:
        loss: `IBotLoss` (its patch center). weight: this step's weight.
        masks: the batch's block masks (`PatchMasks`, drawn by the loader for the step's micro-batches), or
            one micro-batch's.
    """

    def __init__(self, loss: IBotLoss, weight: float, masks: PatchMasks, _teacher_outputs: list | None = None):
        self.loss, self.masks = loss, masks
        self.weights = {IBOT: weight}
        self._teacher_outputs = [] if _teacher_outputs is None else _teacher_outputs

    def student_options(self) -> dict:
        return {"bool_masked_pos": self.masks.crop_masks(), "patch_indices": self.masks.indices[0]}

    def teacher_options(self) -> dict:
        return {"patch_indices": self.masks.indices[0]}

    def micro_batches(self, count: int) -> list["Term"]:
        if len(self.masks.indices) != count:
            raise ValueError(
                f"the masks were drawn for {len(self.masks.indices)} micro-batches and the step makes {count}; "
                "build the loader's BlockMasking with micro_batches=accumulation_steps"
            )
        shared = self._teacher_outputs  # every micro-batch's teacher outputs feed the one center update
        shared.clear()
        return [IBotTerm(self.loss, self.weights[IBOT], masks, shared) for masks in self.masks.micro_batches()]

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        self._teacher_outputs.append(outputs.teacher_patch_logits)
        value = self.loss(
            outputs.patch_logits,
            outputs.teacher_patch_logits,
            self.masks.weights[0],
            outputs.teacher_temp,
            2 * len(outputs.crops[0]),
        )
        return {IBOT: value}

    def after_step(self, skip: torch.Tensor) -> None:
        """The patch center, over the masked patches of the whole batch (all micro-batches)."""
        self.loss.update_center(torch.cat(self._teacher_outputs), self.masks.weights.flatten(), keep=skip)
        self._teacher_outputs.clear()


__all__ = ["AnchorTerm", "IBotTerm", "KoLeoTerm", "StudentOutputs", "Term"]
