import math

import numpy as np
import pytest

from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.schedules import (
    backbone_lr_factor_at,
    cosine_schedule_value,
    learning_rate_at,
    scaled_learning_rate,
    teacher_momentum_at,
    teacher_temperature_at,
    weight_decay_at,
)


def reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """The reference's `utils.cosine_scheduler`, verbatim."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_matches_reference_scheduler_at_every_step(warmup_epochs):
    epochs, niter = 10, 7
    reference = reference_cosine_scheduler(0.002, 1e-6, epochs, niter, warmup_epochs, start_warmup_value=1e-4)
    ours = [
        cosine_schedule_value(step, epochs * niter, 0.002, 1e-6, warmup_epochs * niter, warmup_start=1e-4)
        for step in range(epochs * niter)
    ]
    np.testing.assert_allclose(ours, reference, rtol=1e-13, atol=0)


def test_linear_scaling_rule():
    assert scaled_learning_rate(0.0005, 1024) == pytest.approx(0.002)  # paper: 16 GPUs x 64
    assert scaled_learning_rate(0.0005, 256) == 0.0005


def test_sqrt_scaling_rule():
    # DINOv2's utils/config.py: base_lr x sqrt(batch_size_per_gpu x world_size / 1024).
    assert scaled_learning_rate(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scaled_learning_rate(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_learning_rate(0.004, 64, "sqrt_wrt_1024") == pytest.approx(0.001)
    with pytest.raises(ValueError, match="sqrt_wrt_1024"):
        scaled_learning_rate(0.004, 64, "sqrt")


def test_learning_rate_pinned_values():
    # 100 steps, 10 of warm-up from 0 to 0.002, then cosine over N = 90 steps to 1e-6.
    kwargs = dict(total_steps=100, peak_lr=0.002, min_lr=1e-6, warmup_steps=10)
    assert learning_rate_at(0, **kwargs) == 0.0
    assert learning_rate_at(1, **kwargs) == pytest.approx(0.002 / 9)  # linspace step: 0.002 / (10 - 1)
    assert learning_rate_at(9, **kwargs) == 0.002  # end of warm-up (np.linspace includes the end)
    assert learning_rate_at(10, **kwargs) == pytest.approx(0.002, rel=1e-12)  # cosine i = 0
    assert learning_rate_at(55, **kwargs) == pytest.approx(1e-6 + 0.5 * (0.002 - 1e-6), rel=1e-12)  # i = N/2
    last = 1e-6 + 0.5 * (0.002 - 1e-6) * (1 - math.cos(math.pi / 90))  # i = 89: cos(89 pi / 90) = -cos(pi / 90)
    assert learning_rate_at(99, **kwargs) == pytest.approx(last, rel=1e-9)
    assert learning_rate_at(99, **kwargs) == pytest.approx(1.60886e-6, rel=1e-5)


def test_weight_decay_pinned_values():
    assert weight_decay_at(0, 200) == pytest.approx(0.04, rel=1e-12)
    assert weight_decay_at(100, 200) == pytest.approx(0.22, rel=1e-12)
    assert weight_decay_at(199, 200) == pytest.approx(0.4 - 0.18 * (1 - math.cos(math.pi / 200)), rel=1e-12)
    assert 0.3999 < weight_decay_at(199, 200) < 0.4


def test_teacher_momentum_pinned_values():
    assert teacher_momentum_at(0, 1000) == pytest.approx(0.996, rel=1e-12)
    assert teacher_momentum_at(500, 1000) == pytest.approx(0.998, rel=1e-12)
    assert teacher_momentum_at(999, 1000) == pytest.approx(1 - 0.002 * (1 - math.cos(math.pi / 1000)), rel=1e-12)
    assert teacher_momentum_at(0, 1000, momentum_teacher=0.9995) == pytest.approx(0.9995, rel=1e-12)


def test_teacher_temperature_pinned_values():
    # Paper recipe: 0.04 -> 0.07 over 30 (epochs), then constant.
    reference = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    ours = [teacher_temperature_at(step, 30, 0.04, 0.07) for step in range(100)]
    assert ours == reference.tolist()
    assert ours[0] == 0.04 and ours[29] == 0.07 and ours[99] == 0.07
    assert ours[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    # Reference defaults: no warm-up.
    assert teacher_temperature_at(0, 0) == 0.04


def test_out_of_range_steps_are_refused():
    with pytest.raises(ValueError, match="outside the schedule"):
        learning_rate_at(100, 100, 0.002)
    with pytest.raises(ValueError, match="warmup_steps"):
        learning_rate_at(0, 10, 0.002, warmup_steps=10)
    with pytest.raises(ValueError, match="non-negative"):
        teacher_temperature_at(-1, 10)


def test_backbone_lr_factor_pinned_values():
    # The head alone for 3 steps, then the backbone's own warm-up np.linspace(0, 1, 5), then 1.
    ours = [backbone_lr_factor_at(step, 3, 5) for step in range(10)]
    assert ours == [0.0] * 3 + np.linspace(0, 1, 5).tolist() + [1.0, 1.0]
    assert ours[3:8] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [backbone_lr_factor_at(step, 2, 0) for step in range(4)] == [0.0, 0.0, 1.0, 1.0]  # joins at once
    assert [backbone_lr_factor_at(step, 0, 0) for step in range(3)] == [1.0, 1.0, 1.0]  # the paper's recipe
    with pytest.raises(ValueError, match=">= 0"):
        backbone_lr_factor_at(-1, 3, 5)


def plan(tmp_path, fresh_head=True, **overrides) -> TrainingPlan:
    """40 steps of 4 images, 10 per epoch: an lr warm-up of 2 epochs = 20 steps."""
    options = dict(per_device_train_batch_size=4, num_train_epochs=4, warmup_epochs=2, **overrides)
    args = DinoTrainingArguments(train_dir=str(tmp_path), **options)
    return TrainingPlan.from_args(args, samples_per_epoch=40, num_processes=1, fresh_head=fresh_head)


def test_the_backbone_warm_up_lasts_the_lr_warm_up_after_a_head_warm_up(tmp_path):
    warmed = plan(tmp_path, head_warmup_steps=5)
    assert (warmed.lr_warmup_steps, warmed.head_warmup_steps, warmed.backbone_warmup_steps) == (20, 5, 20)
    factors = [warmed.schedule(step)["backbone_lr_factor"] for step in range(40)]
    assert factors == [backbone_lr_factor_at(step, 5, 20) for step in range(40)]
    assert factors[4] == 0.0 and factors[5] == 0.0 and factors[6] == pytest.approx(1 / 19) and factors[24] == 1.0
    assert [warmed.step_values(step).freeze_backbone for step in (4, 5)] == [True, False]
    explicit = plan(tmp_path, head_warmup_steps=5, backbone_warmup_steps=0)
    assert [explicit.schedule(step)["backbone_lr_factor"] for step in (4, 5)] == [0.0, 1.0]


def test_without_a_head_warm_up_the_schedules_are_the_papers(tmp_path):
    for unchanged in (plan(tmp_path), plan(tmp_path, fresh_head=False, head_warmup_steps=5)):
        assert unchanged.backbone_warmup_steps == 0
        assert set(unchanged.schedule(3)) == {"lr", "weight_decay", "momentum", "teacher_temp"}
    own = plan(tmp_path, backbone_warmup_steps=4)  # asked for: the backbone warms up from step 0
    assert [own.schedule(step)["backbone_lr_factor"] for step in range(5)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0]


def test_a_logging_step_shows_the_schedules_the_run_has(tmp_path):
    dino = plan(tmp_path)
    distil = plan(tmp_path, distill_from="timm:resnet10t", dino_loss_weight=0, local_crops_number=0)
    ema_student = plan(
        tmp_path, distill_from="timm:resnet10t", dino_loss_weight=0, local_crops_number=0, distill_ema_student=True
    )
    assert set(dino.logged_schedule(3)) == {"lr", "weight_decay", "momentum", "teacher_temp"}
    assert set(distil.logged_schedule(3)) == {"lr", "weight_decay"}
    assert set(ema_student.logged_schedule(3)) == {"lr", "weight_decay", "momentum"}
    assert distil.logged_schedule(3)["lr"] == distil.schedule(3)["lr"]


def test_the_warm_up_is_the_shorter_of_its_epochs_and_its_share_of_the_run(tmp_path):
    # 40 steps, 10 per epoch: 2 warm-up epochs are 20 steps; a tenth of the run is 4.
    assert plan(tmp_path).lr_warmup_steps == 20
    assert plan(tmp_path, warmup_fraction=0.1).lr_warmup_steps == 4
    assert plan(tmp_path, warmup_fraction=0.05).lr_warmup_steps == 2
    args = DinoTrainingArguments(
        train_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=400,
        warmup_epochs=2,
        warmup_fraction=0.1,
    )
    long = TrainingPlan.from_args(args, samples_per_epoch=40, num_processes=1, fresh_head=True)
    assert long.lr_warmup_steps == 20  # 4000 steps: the 2 epochs are shorter than a tenth of the run
    with pytest.raises(ValueError, match="--warmup_fraction=1.5 is not valid"):
        plan(tmp_path, warmup_fraction=1.5)


def test_a_student_with_batchnorm_takes_its_own_weight_decay_and_the_plan_says_so(tmp_path):
    args = DinoTrainingArguments(
        train_dir=str(tmp_path), per_device_train_batch_size=4, weight_decay_batchnorm=1e-6, warmup_epochs=0
    )
    cnn = TrainingPlan.from_args(args, samples_per_epoch=40, num_processes=1, fresh_head=False, batchnorm=True)
    vit = TrainingPlan.from_args(args, samples_per_epoch=40, num_processes=1, fresh_head=False, batchnorm=False)
    assert [cnn.schedule(step)["weight_decay"] for step in (0, 50, cnn.total_steps - 1)] == [1e-6] * 3
    assert vit.schedule(0)["weight_decay"] == pytest.approx(0.04)
    assert vit.schedule(vit.total_steps - 1)["weight_decay"] == pytest.approx(0.4, rel=1e-2)
    assert any("BatchNorm layers: weight decay 1e-06" in note for note in cnn.notes())
    assert not any("BatchNorm" in note for note in vit.notes())
