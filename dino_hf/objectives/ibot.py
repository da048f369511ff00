"""iBOT's masked-patch loss on DINO's loop (Zhou et al. 2022; DINOv2, Oquab et al. 2023, Sec. 3;
reference `dinov2/loss/ibot_patch_loss.py: iBOTPatchLoss`), off by default.

The student sees its 2 global crops with some patches replaced by the backbone's learned mask token
(`dino_hf.data.masks`: block masks drawn in the DataLoader workers); the teacher sees them whole. At
each masked patch the student's patch token, through the head (DINO's own, or a separate one of the
same shape: `--ibot_separate_head`, DINOv3), is trained to predict the teacher's patch token through
the teacher's head:

    loss = sum over masked patches p of crop i of  w_p * CE_p,   w_p = 1 / (masked patches of crop i),
    CE_p = -sum_k target_pk log softmax(s_p / student_temp)_k,   divided by 2b (the global crops),

with targets softmax((t_p - c_patch) / teacher_temp) and a patch center of its own, or Sinkhorn-Knopp
over all masked patches of all processes (`--centering sinkhorn_knopp`). It is added to the DINO loss
with weight `--ibot_loss_weight` (1.0 in DINOv2).

The masked patches come as a fixed number M of rows per micro-batch (`PatchMasks.indices`, padded,
the padding weighted 0), so that every step has the same shapes and reads nothing back from the device.
"""

import torch
from torch.nn import functional as F

from ..data.masks import PatchMasks
from .dino import CENTERINGS, CenteredLoss, sinkhorn_knopp, sum_over_processes_
from .term import StudentOutputs, Term

# The name of the term in a step's metrics.
IBOT = "ibot"


class IBotLoss(CenteredLoss):
    """Cross-entropy between the teacher's and the student's head outputs at the masked patches, with
    the patch center.

    Args:
        out_dim (`int`): number of prototypes K of the head the patch tokens go through.
        student_temp (`float`, defaults to 0.1): temperature of the student softmax.
        center_momentum (`float`, defaults to 0.9): EMA momentum of the patch center.
        centering (`str`, defaults to `"center"`): `"center"`, the patch center; `"sinkhorn_knopp"`,
            Sinkhorn-Knopp over the masked patches (the center is then neither used nor updated).
        sinkhorn_iterations (`int`, defaults to 3): Sinkhorn-Knopp iterations.

    The patch center is a persistent buffer `center (1, K)`, saved with the checkpoints
    (`ibot_loss.safetensors`); it starts at zero.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ):
        if centering not in CENTERINGS:
            raise ValueError(f"centering={centering!r} is not known; use one of {', '.join(CENTERINGS)}")
        super().__init__(out_dim, student_temp, center_momentum, centering, sinkhorn_iterations)

    def forward(
        self,
        student_patch_output: torch.Tensor,
        teacher_patch_output: torch.Tensor,
        weights: torch.Tensor,
        teacher_temp: float,
        crops: int,
    ) -> torch.Tensor:
        """The loss of one micro-batch (the center is not updated: `update_center` does it, once per step).

        Args:
            student_patch_output (`torch.Tensor` of shape `(M, K)`): the student head's logits at the
                masked patches (and the padding rows).
            teacher_patch_output (`torch.Tensor` of shape `(M, K)`): the teacher head's, at the same patches.
            weights (`torch.Tensor` of shape `(M,)`): 1 / (masked patches of the crop) per masked row, 0
                for the padding (`PatchMasks.weights`).
            teacher_temp (`float`): this step's teacher temperature (the DINO loss's).
            crops (`int`): the global crops of the micro-batch, 2b: the loss's divisor.

        Returns:
            The scalar loss (0-dim tensor).
        """
        if student_patch_output.shape != teacher_patch_output.shape or student_patch_output.shape[:1] != weights.shape:
            raise ValueError(
                f"the student's and the teacher's patch outputs (M, K) and the weights (M,) should cover the same "
                f"M rows, got {tuple(student_patch_output.shape)}, {tuple(teacher_patch_output.shape)} and "
                f"{tuple(weights.shape)}"
            )
        targets = self.targets(teacher_patch_output, weights, teacher_temp)  # (M, K)
        log_probs = F.log_softmax(student_patch_output / self.student_temp, dim=-1)  # (M, K)
        cross_entropy = torch.sum(-targets * log_probs, dim=-1)  # (M,)
        return torch.sum(cross_entropy * weights) / crops

    @torch.no_grad()
    def targets(self, teacher_patch_output: torch.Tensor, weights: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher's distributions `(M, K)` at the masked patches: centred and sharpened with the
        patch center, or Sinkhorn-Knopp over the masked rows of all processes (padding rows: zeros)."""
        if self.uses_center:
            return F.softmax((teacher_patch_output - self.center) / teacher_temp, dim=-1)
        return sinkhorn_knopp(teacher_patch_output, teacher_temp, self.sinkhorn_iterations, valid=weights > 0)

    @torch.no_grad()
    def update_center(
        self, teacher_patch_output: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None
    ) -> None:
        """c_patch = m * c_patch + (1 - m) * the mean teacher output over the masked patches of all
        processes (`weights > 0` marks them in `teacher_patch_output (M, K)`).

        The sum and the count are all-reduced over the processes when `torch.distributed` is
        initialised. `keep` (a bool tensor, optional): where true the center stays as it is (a skipped
        step); it also stays when no patch was masked. Nothing with Sinkhorn-Knopp centering.
        """
        if not self.uses_center:
            return
        masked = (weights > 0).to(torch.float32)  # (M,)
        sums = torch.cat([masked @ teacher_patch_output.float(), masked.sum().reshape(1)])  # (K + 1,)
        sum_over_processes_(sums)
        total, count = sums[:-1], sums[-1]
        batch_center = (total / count.clamp_min(1.0)).unsqueeze(0)  # (1, K)
        self._move_center_(batch_center, count == 0 if keep is None else keep | (count == 0))


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


__all__ = ["IBOT", "IBotLoss", "IBotTerm"]
