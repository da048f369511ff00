"""Per-iteration schedules of DINO, as pure functions of the global step.

The reference precomputes arrays with its `cosine_scheduler` (length epochs x iterations per epoch)
and indexes them by the global iteration; these functions return the same values without the
arrays:
- warm-up (`warmup_steps` > 0): `np.linspace(warmup_start, base, warmup_steps)[step]`, which reaches
  `base` at step `warmup_steps - 1`;
- then, with i = step - warmup_steps and N = total_steps - warmup_steps:
  `final + 0.5 * (base - final) * (1 + cos(pi * i / N))`, which equals `base` at i = 0 and is still
  slightly above `final` at the last step i = N - 1.
"""

import math


def cosine_schedule_value(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> float:
    """Value at `step` (0-based) of the reference's `cosine_scheduler` of `total_steps` iterations."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}; "
            "shorten the warm-up or train for more steps"
        )
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside the schedule of {total_steps} steps (0 to {total_steps - 1})")
    if step < warmup_steps:
        return _linspace_value(step, warmup_steps, warmup_start, base)
    i, n = step - warmup_steps, total_steps - warmup_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


LR_SCALING_RULES = ("linear", "sqrt_wrt_1024", "sqrt_wrt_1536")


def scaled_learning_rate(base_lr: float, total_batch: int, rule: str = "linear") -> float:
    """The peak learning rate for a batch of `total_batch` images.

    `linear` is DINO's rule (paper Sec. 4, "Implementation details"): base_lr x batch / 256.
    `sqrt_wrt_1024` is DINOv2's and DINOv3's (`optim.scaling_rule`): base_lr x sqrt(batch / 1024).
    `sqrt_wrt_1536` is LightlyTrain's distillation's: base_lr x sqrt(batch / 1536).
    `total_batch` is the batch over all processes (per-process batch x world size x accumulation).
    """
    if rule == "linear":
        return base_lr * total_batch / 256.0
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch / 1024.0)
    if rule == "sqrt_wrt_1536":
        return base_lr * math.sqrt(total_batch / 1536.0)
    raise ValueError(f"unknown learning-rate scaling rule {rule!r}; choose one of {', '.join(LR_SCALING_RULES)}")


def learning_rate_at(
    step: int,
    total_steps: int,
    peak_lr: float,
    min_lr: float = 1e-6,
    warmup_steps: int = 0,
) -> float:
    """Learning rate: linear warm-up from 0 to `peak_lr`, then cosine to `min_lr`.

    `peak_lr` is the already scaled rate (`scaled_learning_rate(0.0005, total_batch)` for ViT-S);
    the reference warms up over 10 epochs.
    """
    return cosine_schedule_value(step, total_steps, peak_lr, min_lr, warmup_steps=warmup_steps, warmup_start=0.0)


def weight_decay_at(step: int, total_steps: int, weight_decay: float = 0.04, weight_decay_end: float = 0.4) -> float:
    """Weight decay of the regularised parameter group: cosine from 0.04 to 0.4, no warm-up."""
    return cosine_schedule_value(step, total_steps, weight_decay, weight_decay_end)


def teacher_momentum_at(step: int, total_steps: int, momentum_teacher: float = 0.996) -> float:
    """EMA momentum of the teacher: cosine from `momentum_teacher` (0.996; 0.9995 for batch 256) to 1."""
    return cosine_schedule_value(step, total_steps, momentum_teacher, 1.0)


def teacher_temperature_at(
    step: int,
    warmup_steps: int,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.04,
) -> float:
    """Teacher temperature: linear warm-up from `warmup_teacher_temp` to `teacher_temp` over
    `warmup_steps` (`np.linspace`, reaching `teacher_temp` at step `warmup_steps - 1`), then constant.

    The reference steps it once per epoch (`warmup_teacher_temp_epochs`); passing the epoch as
    `step` and the warm-up epochs as `warmup_steps` reproduces it exactly, passing iterations gives
    the per-iteration version. Paper recipe for long runs: 0.04 -> 0.07 over 30 epochs.
    """
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    if step < warmup_steps:
        return _linspace_value(step, warmup_steps, warmup_teacher_temp, teacher_temp)
    return teacher_temp


def backbone_lr_factor_at(step: int, head_warmup_steps: int, backbone_warmup_steps: int) -> float:
    """Multiplier of the backbone's learning rate (on top of the global schedule and the layer decay):
    0 while the head trains alone (`step < head_warmup_steps`), then a linear warm-up of its own from
    0 to 1 over `backbone_warmup_steps` (`np.linspace(0, 1, n)[step - head_warmup_steps]`, as the lr
    warm-up), then 1. Both 0 (the paper's recipe): 1 at every step.

    Continued pretraining (docs/recipe.md#layer-decay-freezing-and-the-backbone-warm-up): a backbone that
    joins after the head warm-up starts from lr 0 rather than at the global schedule's value of that step.
    """
    if step < 0 or head_warmup_steps < 0 or backbone_warmup_steps < 0:
        raise ValueError(
            f"step {step}, head_warmup_steps {head_warmup_steps} and backbone_warmup_steps "
            f"{backbone_warmup_steps} must all be >= 0"
        )
    if step < head_warmup_steps:
        return 0.0
    if step < head_warmup_steps + backbone_warmup_steps:
        return _linspace_value(step - head_warmup_steps, backbone_warmup_steps, 0.0, 1.0)
    return 1.0


def _linspace_value(step: int, num: int, start: float, stop: float) -> float:
    """`np.linspace(start, stop, num)[step]` (endpoint included; a single point is `start`)."""
    if num == 1:
        return start
    if step == num - 1:
        return stop
    return step * ((stop - start) / (num - 1)) + start


__all__ = [
    "backbone_lr_factor_at",
    "cosine_schedule_value",
    "learning_rate_at",
    "LR_SCALING_RULES",
    "scaled_learning_rate",
    "teacher_momentum_at",
    "teacher_temperature_at",
    "weight_decay_at",
]
