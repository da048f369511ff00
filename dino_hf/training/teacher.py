"""The teacher of DINO: its construction from the student and its EMA.

Both networks are backbone + head behind a `MultiCropWrapper`, as the reference, so their state dict
keys are `backbone.*` and `head.*`. The teacher is built from the student and never receives
gradients: it follows the student by an exponential moving average of the parameters
(paper Sec. 3.1 "Teacher network"), theta_t = m * theta_t + (1 - m) * theta_s.
"""

import copy

import torch
from torch import nn

from ..models.multicrop_wrapper import MultiCropWrapper
from .sharding import local_tensors


def build_teacher(student: MultiCropWrapper, shared: dict[int, nn.Parameter] | None = None) -> MultiCropWrapper:
    """The teacher: a copy of the student with gradients off.

    `shared` (`id(parameter)` -> parameter, `lora.shared_parameters`): the student's frozen parameters that
    the teacher holds themselves rather than copies (a LoRA run's base weights, held once).

    As in the reference, the teacher's head has `norm_last_layer=True` semantics (its
    `last_layer.weight_g` is not trained; it only follows the student's through the EMA), and its
    backbone has no stochastic depth (the reference builds the teacher without `drop_path_rate`).
    The teacher stays in the student's train/eval mode: with BatchNorm, it normalises with the
    statistics of its own batch, as the reference's.
    """
    teacher = copy.deepcopy(student, memo=dict(shared or {}))
    for module in teacher.modules():
        if isinstance(getattr(module, "drop_prob", None), float):
            module.drop_prob = 0.0
    if hasattr(teacher.head, "norm_last_layer"):
        teacher.head.norm_last_layer = True
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s for every parameter, in place.

    Parameters are paired in `parameters()` order (trainable and frozen alike, as the reference);
    buffers (BatchNorm statistics, the loss center) are not averaged. Uses fused multi-tensor ops. A pair
    that is one and the same parameter (a LoRA run's frozen base, `build_teacher(..., shared)`) is skipped:
    m * p + (1 - m) * p need not give p back bit for bit.
    Under FSDP (`sharding.shard_like`) each process averages its own shards.

    Args:
        teacher (`nn.Module`): updated in place.
        student (`nn.Module`): the same architecture, unwrapped (not the DDP wrapper).
        momentum (`float` or 0-dim `torch.Tensor` on the parameters' device): m of this step
            (`teacher_momentum_at`), in [0, 1]; 1 leaves the teacher unchanged. A tensor is used as
            it is, without reading it back (`train_step` sets it to 1 on a skipped step).
    """
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameters and student {len(student_params)}; build the "
            "teacher with build_teacher(student) and pass the unwrapped student (accelerator.unwrap_model)"
        )
    pairs = [(t, s) for t, s in zip(teacher_params, student_params) if t is not s]
    teacher_params = local_tensors([t for t, _ in pairs])
    student_params = local_tensors([s.detach() for _, s in pairs])
    torch._foreach_mul_(teacher_params, momentum)
    if isinstance(momentum, torch.Tensor):
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1.0 - momentum))
    else:
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


__all__ = ["build_teacher", "ema_update_"]
