"""The DINO loss (Caron et al. 2021, Sec. 3.1, Algorithm 1) and cheap collapse diagnostics.

The teacher's output is centred (a running mean of its outputs is subtracted) and sharpened (a low
temperature); the student is trained to match it with a cross-entropy over every pair of a teacher
crop and a student crop of a different view. Centring and sharpening together avoid collapse
(paper Sec. 5.3).
"""

import torch
from torch import nn
from torch.nn import functional as F


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over crop pairs.

    Args:
        out_dim (`int`): number of prototypes K (the head's `out_dim`).
        ncrops (`int`): crops the student sees per image (2 global + local ones, 10 in the paper).
        student_temp (`float`, defaults to 0.1): temperature of the student softmax.
        center_momentum (`float`, defaults to 0.9): EMA momentum of the center.

    The center is a persistent buffer `center (1, K)`: it is saved in the state dict. It is updated
    after the loss with the mean teacher output over all processes.
    """

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"ncrops counts the 2 global crops plus the local ones, so it is at least 2; got {ncrops}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float, update_center: bool = True
    ) -> torch.Tensor:
        """Loss of one step; updates the center afterwards (unless `update_center=False`: the caller
        then calls `update_center` itself, e.g. once for all micro-batches of an accumulated step).

        Args:
            student_output (`torch.Tensor` of shape `(ncrops * B, K)`): student logits, crops in the
                multi-crop order [global 1 batch, global 2 batch, local 1 batch, ...].
            teacher_output (`torch.Tensor` of shape `(2 * B, K)`): teacher logits on the 2 global crops.
            teacher_temp (`float`): teacher temperature of this step (`teacher_temperature_at`).

        Returns:
            The scalar loss: the mean over the 2 * ncrops - 2 pairs (teacher crop iq, student crop v
            != iq) of the batch mean of `sum_k -q_k log p_k`.
        """
        self._check_shapes(student_output, teacher_output)
        student_log_probs = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.ncrops)
        teacher_probs = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total_loss = 0.0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_probs):
            for v, log_p in enumerate(student_log_probs):
                if v == iq:  # same view seen by teacher and student: skipped
                    continue
                total_loss = total_loss + torch.sum(-q * log_p, dim=-1).mean()
                n_loss_terms += 1
        if update_center:
            self.update_center(teacher_output)
        return total_loss / n_loss_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """center = m * center + (1 - m) * mean of `teacher_output (2 * B, K)` over all processes."""
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)  # (1, K)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            world_size = torch.distributed.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> None:
        if student_output.ndim != 2 or student_output.shape[-1] != self.out_dim:
            raise ValueError(
                f"student_output should be (ncrops * B, {self.out_dim}), got {tuple(student_output.shape)}; "
                "check the head's out_dim against DinoLoss(out_dim=...)"
            )
        if teacher_output.ndim != 2 or teacher_output.shape[-1] != self.out_dim or len(teacher_output) % 2:
            raise ValueError(
                f"teacher_output should be (2 * B, {self.out_dim}) from the 2 global crops, "
                f"got {tuple(teacher_output.shape)}"
            )
        batch = len(teacher_output) // 2
        if len(student_output) != self.ncrops * batch:
            raise ValueError(
                f"student_output has {len(student_output)} rows but ncrops={self.ncrops} crops of batch {batch} "
                f"make {self.ncrops * batch}; pass all crops to the student and only the 2 global ones to the teacher"
            )


@torch.no_grad()
def collapse_diagnostics(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
) -> dict[str, float]:
    """Numbers that show collapse early (paper Sec. 5.3, Fig. 7), from the tensors of one step.

    Args:
        student_output (`torch.Tensor` of shape `(ncrops * B, K)`): student logits.
        teacher_output (`torch.Tensor` of shape `(2 * B, K)`): teacher logits on the global crops.
        center (`torch.Tensor` of shape `(1, K)`): the center the loss used.
        teacher_temp (`float`): teacher temperature of the step.
        student_temp (`float`, defaults to 0.1): student temperature.

    Returns:
        `teacher_entropy`: mean entropy of the teacher distributions (ln K at uniform collapse, 0 at
            one-hot collapse); `teacher_max_prob`: mean largest teacher probability;
            `kl_teacher_student`: mean KL(teacher || student) over the loss's crop pairs (0 when the
            student copies the teacher, as in collapse); `center_norm`: L2 norm of the center;
            `distinct_prototypes`: number of different argmax prototypes over the teacher batch
            (1 when every image maps to the same prototype).
    """
    teacher_probs = F.softmax((teacher_output.float() - center.float()) / teacher_temp, dim=-1)  # (2B, K)
    teacher_log_probs = torch.log(teacher_probs.clamp_min(torch.finfo(teacher_probs.dtype).tiny))
    entropy = -(teacher_probs * teacher_log_probs).sum(-1)  # (2B,)
    batch = len(teacher_output) // 2
    ncrops = len(student_output) // batch
    q = teacher_probs.view(2, batch, -1)  # (2, B, K)
    log_p = F.log_softmax(student_output.float() / student_temp, dim=-1).view(ncrops, batch, -1)  # (V, B, K)
    cross_entropy = -torch.einsum("ibk,vbk->iv", q, log_p) / batch  # (2, V): batch-mean CE per pair
    pairs = ~torch.eye(2, ncrops, dtype=torch.bool, device=q.device)
    kl = cross_entropy - entropy.view(2, batch).mean(1, keepdim=True)  # (2, V)
    return {
        "teacher_entropy": entropy.mean().item(),
        "teacher_max_prob": teacher_probs.max(dim=-1).values.mean().item(),
        "kl_teacher_student": kl[pairs].mean().item(),
        "center_norm": center.float().norm().item(),
        "distinct_prototypes": float(torch.unique(teacher_probs.argmax(dim=-1)).numel()),
    }


__all__ = ["DinoLoss", "collapse_diagnostics"]
