"""UNIC's teacher dropping (dino_hf/objectives/teacher_dropping.py): the hardest teacher stays, the others
are dropped with probability p, and the loss is the mean over the kept pairs with gradient only there."""

import pytest
import torch

from dino_hf.objectives.teacher_dropping import dropped_teacher_loss, teacher_keep_mask


def test_the_teacher_of_highest_loss_is_always_kept():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = torch.rand(64, 4, generator=generator)
        keep = teacher_keep_mask(losses, 0.9, generator)
        assert keep.dtype == torch.bool and keep.shape == (64, 4)
        assert keep[torch.arange(64), losses.argmax(1)].all()


def test_probability_0_keeps_every_teacher_and_1_exactly_the_hardest():
    losses = torch.rand(32, 3)
    assert teacher_keep_mask(losses, 0.0).all()
    keep = teacher_keep_mask(losses, 1.0)
    assert torch.equal(keep.sum(1), torch.ones(32, dtype=torch.long))
    assert torch.equal(keep.float().argmax(1), losses.argmax(1))


def test_the_other_teachers_are_kept_half_the_time():
    generator = torch.Generator().manual_seed(0)
    losses = torch.tensor([[3.0, 1.0, 2.0, 0.5]]).expand(20000, 4)  # teacher 0 is the hardest
    keep = teacher_keep_mask(losses, 0.5, generator).float()
    assert keep[:, 0].all()
    # 20000 draws: the standard error of a frequency of 0.5 is 0.0035
    torch.testing.assert_close(keep[:, 1:].mean(0), torch.full((3,), 0.5), atol=0.015, rtol=0)


def test_a_seeded_generator_repeats_the_mask():
    losses = torch.rand(16, 5)
    first = teacher_keep_mask(losses, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(teacher_keep_mask(losses, 0.5, torch.Generator().manual_seed(7)), first)


def test_the_loss_is_the_mean_over_kept_pairs_with_gradient_only_through_them():
    losses = torch.tensor([[1.0, 4.0, 2.0], [3.0, 0.5, 6.0]], requires_grad=True)
    keep = torch.tensor([[True, True, False], [False, True, True]])
    loss = dropped_teacher_loss(losses, keep)
    assert loss.item() == pytest.approx((1.0 + 4.0 + 0.5 + 6.0) / 4)
    loss.backward()
    assert torch.equal(losses.grad, keep.float() / 4)


def test_teacher_keep_mask_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        teacher_keep_mask(torch.rand(4), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        teacher_keep_mask(torch.rand(4, 2), 1.5)
