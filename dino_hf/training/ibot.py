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
from torch import nn
from torch.nn import functional as F

from ..data.masks import BlockMasking
from .arguments import DinoTrainingArguments
from .loss import CENTERINGS, CenteredLoss, sinkhorn_knopp, sum_over_processes_

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


def build_ibot_loss(args: DinoTrainingArguments) -> IBotLoss | None:
    """The run's iBOT loss (on the DINO loss's temperatures, center momentum and centering), or None
    when `--ibot_loss_weight` is 0."""
    if not args.ibot_loss_weight:
        return None
    return IBotLoss(
        args.out_dim,
        student_temp=args.student_temp,
        center_momentum=args.center_momentum,
        centering=args.centering,
        sinkhorn_iterations=args.sinkhorn_iterations,
    )


def build_masking(args: DinoTrainingArguments, backbone: nn.Module) -> BlockMasking | None:
    """How the run's batches are masked, or None when `--ibot_loss_weight` is 0. The patch grid is the
    global crop size over the backbone's patch size; each micro-batch of `per_device_train_batch_size`
    images is masked on its own."""
    if not args.ibot_loss_weight:
        return None
    patch_size = backbone.model.config.patch_size
    patch_size = int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)
    side = args.global_crops_size // patch_size
    return BlockMasking(
        grid=(side, side),
        ratio_min_max=tuple(args.mask_ratio_min_max),
        sample_probability=args.mask_sample_probability,
        micro_batches=args.gradient_accumulation_steps,
    )


__all__ = ["IBOT", "IBotLoss", "build_ibot_loss", "build_masking"]
