"""The terms a step adds to the DINO loss, each with one home.

A term names the values it adds and their weights at this step, says what it needs from the forwards
(the student's backbone features, its patch tokens, masked patches, the distillation projectors), computes
its values from what the forwards gave, and keeps its state (iBOT's patch center, the distillation
queue) with the checkpoint. `dino_hf.training.step.train_step` runs the forwards the active terms need and
adds them up; a new objective is a new term, not new arguments of the step.

The terms here: iBOT's masked-patch loss (`IBotTerm`), DINOv2's KoLeo (`KoLeoTerm`) and the anchor to the
start or to an EMA snapshot (`AnchorTerm`: the Gram loss and the cosine term); distillation from a frozen
model is `dino_hf.objectives.distillation.Distillation`.
"""

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from accelerate import Accelerator


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


__all__ = ["StudentOutputs", "Term"]
