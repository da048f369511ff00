"""The DINO loss (Caron et al. 2021, Sec. 3.1, Algorithm 1) and cheap collapse diagnostics.

The teacher's output is centred (a running mean of its outputs is subtracted) and sharpened (a low
temperature); the student is trained to match it with a cross-entropy over every pair of a teacher
crop and a student crop of a different view. Centring and sharpening together avoid collapse
(paper Sec. 5.3).

Two stabilisers of DINOv2 (Oquab et al. 2023, Sec. 4) are here as options, both off by default:
Sinkhorn-Knopp centering of the teacher (`DinoLoss(centering="sinkhorn_knopp")`, `sinkhorn_knopp`)
and the KoLeo regulariser of the student's features (`dino_hf.objectives.koleo`).
"""

import functools
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

CENTERINGS = ("center", "sinkhorn_knopp")


class CenteredLoss(nn.Module):
    """What the DINO loss and iBOT's patch loss (`dino_hf.objectives.ibot.IBotLoss`) share: the student
    temperature and the teacher's centering, either a running center (a persistent buffer
    `center (1, K)`, starting at zero, moved by an EMA after the loss) or Sinkhorn-Knopp normalisation
    (`sinkhorn_knopp`, `sinkhorn_iterations` iterations; the center is then neither used nor updated).
    """

    def __init__(
        self, out_dim: int, student_temp: float, center_momentum: float, centering: str, sinkhorn_iterations: int
    ):
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @property
    def uses_center(self) -> bool:
        """Whether the running center takes part in the loss (the paper's centering)."""
        return self.centering == "center"

    def _move_center_(self, batch_center: torch.Tensor, stays: torch.Tensor | None) -> None:
        """center = m * center + (1 - m) * `batch_center (1, K)` (cast to the center's dtype), except
        where the bool tensor `stays` is true (None: everywhere moved)."""
        m = self.center_momentum
        updated = self.center * m + batch_center.to(self.center.dtype) * (1 - m)
        self.center.copy_(updated if stays is None else torch.where(stays, self.center, updated))


def sum_over_processes_(tensor: torch.Tensor) -> int:
    """Sums `tensor` in place over the processes when `torch.distributed` is initialised; returns the
    number of processes (1 without)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
        return torch.distributed.get_world_size()
    return 1


class DinoLoss(CenteredLoss):
    """Cross-entropy between the centred, sharpened teacher and the student over crop pairs.

    Args:
        out_dim (`int`): number of prototypes K (the head's `out_dim`).
        ncrops (`int`): crops the student sees per image (2 global + local ones, 10 in the paper).
        student_temp (`float`, defaults to 0.1): temperature of the student softmax.
        center_momentum (`float`, defaults to 0.9): EMA momentum of the center.
        centering (`str`, defaults to `"center"`): how the teacher is centred. `"center"` is the paper's
            running center, `softmax((t - c) / teacher_temp)`; `"sinkhorn_knopp"` is DINOv2's
            Sinkhorn-Knopp normalisation over the batch (`sinkhorn_knopp`), and the center is then
            neither used nor updated.
        sinkhorn_iterations (`int`, defaults to 3): Sinkhorn-Knopp iterations (DINOv2's 3); read only
            with `centering="sinkhorn_knopp"`.

    The center is a persistent buffer `center (1, K)`: it is saved in the state dict (also with
    Sinkhorn-Knopp centering, where it stays as it is, so that checkpoints keep one format). It is
    updated after the loss with the mean teacher output over all processes.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ):
        if ncrops < 2:
            raise ValueError(
                f"ncrops counts the 2 global crops plus the local ones, so it is at least 2; got {ncrops}"
            )
        if centering not in CENTERINGS:
            raise ValueError(
                f"centering={centering!r} is not known; use 'center' (the paper's running center) or "
                "'sinkhorn_knopp' (DINOv2)"
            )
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations={sinkhorn_iterations} should be >= 1 (DINOv2 uses 3)")
        super().__init__(out_dim, student_temp, center_momentum, centering, sinkhorn_iterations)
        self.ncrops = ncrops

    def forward(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        update_center: bool = True,
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
        loss = self.terms(student_output, teacher_output, teacher_temp).loss
        if update_center:
            self.update_center(teacher_output)
        return loss

    def terms(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> "LossTerms":
        """The loss with what it is made of (same arguments as `forward`; the center is not updated).

        The cross-entropy of every pair of a teacher crop and a student crop of a different view,
        summed in the reference's order (a contraction over all pairs at once rounds differently, and
        Adam's first step turns that rounding of near-zero gradients into visible weight changes).
        """
        self._check_shapes(student_output, teacher_output)
        student_log_probs = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(self.ncrops)
        if self.uses_center:
            teacher_probs = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach()
        else:
            teacher_probs = sinkhorn_knopp(teacher_output, teacher_temp, self.sinkhorn_iterations)
        q = teacher_probs.view(2, len(teacher_output) // 2, -1)  # (2, B, K)
        zero = student_output.new_zeros((), dtype=student_log_probs[0].dtype)
        rows, total_loss, n_loss_terms = [], 0.0, 0
        for iq in range(2):
            row = []
            for v, log_p in enumerate(student_log_probs):
                if v == iq:  # same view seen by teacher and student: skipped
                    row.append(zero)
                    continue
                term = torch.sum(-q[iq] * log_p, dim=-1).mean()
                total_loss = total_loss + term
                n_loss_terms += 1
                row.append(term)
            rows.append(torch.stack(row))
        cross_entropy = torch.stack(rows)  # (2, V), 0 on the same-view diagonal
        loss = total_loss / n_loss_terms
        return LossTerms(loss, q, cross_entropy)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """center = m * center + (1 - m) * mean of `teacher_output (2 * B, K)` over all processes.

        `keep` (a bool tensor, optional): where true, the center stays as it is (a step skipped on a
        non-finite loss), decided on the device without reading it back. With Sinkhorn-Knopp
        centering the center is not used, and this does nothing.
        """
        if not self.uses_center:
            return
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)  # (1, K)
        world_size = sum_over_processes_(batch_center)
        self._move_center_(batch_center / (len(teacher_output) * world_size), keep)

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
def sinkhorn_knopp(
    teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher distributions by Sinkhorn-Knopp normalisation over the batch, in place of the running
    center (DINOv2, Oquab et al. 2023, Sec. 4; `dinov2/loss/dino_clstoken_loss.py:
    DINOLoss.sinkhorn_knopp_teacher`, after SwAV, Caron et al. 2020).

    Q = exp(t / teacher_temp), transposed to (K, B_all) with B_all the rows of all processes, is divided
    by its sum, then `n_iterations` times: each row (prototype) is divided by its sum over the batch
    and by K, each column (sample) by its sum and by B_all; finally it is multiplied by B_all, so that
    every sample's distribution sums to 1, and the prototypes tend to equal shares B_all / K of the
    batch. The sums over the batch are all-reduced over the processes when `torch.distributed` is
    initialised (the sums over prototypes are within a process).

    Args:
        teacher_output (`torch.Tensor` of shape `(B, K)`): teacher logits of this process (the global
            crops' rows).
        teacher_temp (`float`): teacher temperature of this step.
        n_iterations (`int`, defaults to 3): Sinkhorn-Knopp iterations (DINOv2's 3).
        valid (`torch.Tensor` of shape `(B,)`, bool, optional): the rows that take part (iBOT's masked
            patches; the others are padding of a fixed-shape batch): the other rows get no mass and
            come back as zeros, and B_all counts the valid rows of all processes, as a tensor (no
            host read). A batch without valid rows gives zeros.

    Returns:
        `torch.Tensor` of shape `(B, K)`: the teacher distributions, each row summing to 1, in float32
        (float64 for float64 logits), without gradient.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if distributed else 1
    logits = teacher_output.to(torch.promote_types(teacher_output.dtype, torch.float32)) / teacher_temp  # (B, K)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None], torch.finfo(logits.dtype).min)  # no part in the largest logit
    # Each prototype's largest logit over the batch is taken out so that exp cannot overflow; the first
    # row normalisation divides that factor out again, so the result is the formula's.
    row_max = logits.max(dim=0, keepdim=True).values  # (1, K)
    if distributed:
        torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX)
    q = torch.exp(logits - row_max).t()  # (K, B)
    prototypes, samples = q.shape[0], q.shape[1] * world_size
    floor = _no_floor
    if valid is not None:
        q = q * valid.to(q.dtype)  # (K, B): the padding rows get no mass
        samples = valid.to(q.dtype).sum()
        if distributed:
            torch.distributed.all_reduce(samples)
        floor = functools.partial(torch.clamp_min, min=torch.finfo(q.dtype).tiny)  # empty columns stay 0, not NaN
    total = q.sum()
    if distributed:
        torch.distributed.all_reduce(total)
    q = q / floor(total)
    for _ in range(n_iterations):
        rows = q.sum(dim=1, keepdim=True)  # (K, 1): each prototype's weight, to become 1 / K
        if distributed:
            torch.distributed.all_reduce(rows)
        q = q / floor(rows) / prototypes
        q = q / floor(q.sum(dim=0, keepdim=True)) / floor(samples)  # each sample's weight, to become 1 / B_all
    return (q * samples).t()  # (B, K)


def _no_floor(value: torch.Tensor) -> torch.Tensor:
    return value


class LossTerms(NamedTuple):
    """What `DinoLoss.terms` computes: `loss` (scalar), `teacher_probs (2, B, K)` (the centred,
    sharpened teacher distributions, or the Sinkhorn-Knopp ones; no gradient) and
    `cross_entropy (2, ncrops)` (the batch-mean cross-entropy of each teacher crop against each
    student crop; 0 for the two same-view pairs, which the loss leaves out)."""

    loss: torch.Tensor
    teacher_probs: torch.Tensor
    cross_entropy: torch.Tensor


def _mean_over_pairs(per_pair: torch.Tensor) -> torch.Tensor:
    """Mean of a (2, ncrops) matrix over its 2 * ncrops - 2 pairs of different views (the diagonal,
    where teacher and student see the same crop, is left out)."""
    different_views = 1 - torch.eye(*per_pair.shape, dtype=per_pair.dtype, device=per_pair.device)
    return (per_pair * different_views).sum() / (per_pair.numel() - 2)


@torch.no_grad()
def collapse_diagnostics(terms: LossTerms, center: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Numbers that show collapse early (paper Sec. 5.3, Fig. 7), from the loss terms of one step.

    Args:
        terms (`LossTerms`): from `DinoLoss.terms` (its teacher distributions and pair cross-entropies).
        center (`torch.Tensor` of shape `(1, K)`, or `None`): the center the loss used; `None` with
            Sinkhorn-Knopp centering, which uses none (`center_norm` is then left out).

    Returns:
        0-dim tensors on the device, read by the caller when it logs (no host synchronisation here):
        `teacher_entropy`: mean entropy of the teacher distributions (ln K at uniform collapse, 0 at
            one-hot collapse); `teacher_max_prob`: mean largest teacher probability;
            `kl_teacher_student`: mean KL(teacher || student) over the loss's crop pairs (0 when the
            student copies the teacher, as in collapse); `center_norm`: L2 norm of the center (when
            there is one); `distinct_prototypes`: number of different argmax prototypes over the teacher batch
            (1 when every image maps to the same prototype).
    """
    q = terms.teacher_probs  # (2, B, K)
    entropy = -(q * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(-1)  # (2, B)
    kl = terms.cross_entropy.detach() - entropy.mean(1, keepdim=True)  # (2, V): CE(q, p) - H(q) per pair
    argmax = q.flatten(0, 1).argmax(dim=-1)  # (2B,)
    hit = torch.zeros(q.shape[-1], dtype=q.dtype, device=q.device).index_fill_(0, argmax, 1.0)  # (K,)
    diagnostics = {
        "teacher_entropy": entropy.mean(),
        "teacher_max_prob": q.max(dim=-1).values.mean(),
        "kl_teacher_student": _mean_over_pairs(kl),
        "center_norm": None if center is None else center.float().norm(),
        "distinct_prototypes": hit.sum(),
    }
    return {key: value for key, value in diagnostics.items() if value is not None}


__all__ = [
    "CENTERINGS",
    "CenteredLoss",
    "DinoLoss",
    "LossTerms",
    "collapse_diagnostics",
    "sinkhorn_knopp",
    "sum_over_processes_",
]
