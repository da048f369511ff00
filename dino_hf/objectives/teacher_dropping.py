"""UNIC's teacher dropping (Sariyildiz et al. 2024, "UNIC: Universal Classification Models via Multi-teacher
Distillation"; naver/unic `modeling/teacher_dropping.py`), a regulariser of multi-teacher
distillation: per image, the teacher that the student matches worst (the highest loss) always stays, and
each other teacher is dropped from that image's loss with probability p (UNIC's `--t_drop_prob`, 0.5), so
that the teachers already well matched do not dominate the gradient.

The losses are per image and teacher, `(B, T)`: in UNIC, for each teacher, the mean over its token types
(global token, patch tokens averaged over the patches) of 0.5 x (1 - cosine) + 0.5 x smooth-L1.

What UNIC does with a dropped teacher (`aggregate_losses`): its coefficient is 0 and the loss is the mean
over the kept (image, teacher) pairs of the batch, sum(keep * losses) / sum(keep), the normaliser taken
without gradient; an image with more teachers kept weighs more in the batch (UNIC's comment speaks of
equal weight per image, its code divides by the batch's total count). `dropped_teacher_loss` does the same.
"""

import torch

# UNIC's default probability of dropping a teacher other than the hardest one (`--t_drop_prob`).
DROP_PROBABILITY = 0.5


def teacher_keep_mask(
    losses: torch.Tensor, drop_probability: float = DROP_PROBABILITY, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which teachers each image keeps: the one of highest loss always, each other one with probability
    1 - `drop_probability`, drawn independently per image and teacher (UNIC: dropped when u < p,
    u ~ U[0, 1)). Pure tensor operations: nothing is read back to the host.

    Args:
        losses: `(B, T)` the loss of each image for each teacher (read without gradient; ties go to the
            first teacher).
        drop_probability: p in [0, 1]; 0 keeps every teacher, 1 keeps only the hardest of each image.
        generator: the source of the draws (on its own device; the mask is moved to the losses'); seed it
            per process, so that the processes draw different masks.

    Returns:
        `(B, T)` bool, True where the teacher is kept; every row has at least one True.
    """
    if losses.ndim != 2:
        raise ValueError(f"teacher_keep_mask takes losses (B, T) per image and teacher, got {tuple(losses.shape)}")
    if not 0 <= drop_probability <= 1:
        raise ValueError(f"drop_probability must be in [0, 1], got {drop_probability}; UNIC uses 0.5")
    device = losses.device if generator is None else generator.device
    draws = torch.rand(losses.shape, generator=generator, device=device).to(losses.device)  # (B, T)
    keep = draws >= drop_probability
    hardest = losses.detach().argmax(dim=1, keepdim=True)  # (B, 1)
    return keep.scatter(1, hardest, True)


def dropped_teacher_loss(losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """UNIC's loss with teachers dropped: the mean of `losses (B, T)` over the kept pairs of `keep (B, T)`,
    sum(keep * losses) / sum(keep). A dropped pair gets no gradient; a kept one 1 / sum(keep)."""
    if keep.shape != losses.shape:
        raise ValueError(f"keep {tuple(keep.shape)} and losses {tuple(losses.shape)} must have the same shape (B, T)")
    weights = keep.to(losses.dtype)
    return (weights * losses).sum() / weights.sum()  # sum(keep) >= B >= 1: one teacher per image at least


__all__ = ["DROP_PROBABILITY", "dropped_teacher_loss", "teacher_keep_mask"]
