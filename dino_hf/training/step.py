"""One DINO optimisation step (Caron et al. 2021, Algorithm 1), and nothing else.

No data, no logging, no schedules: `train_step` takes this step's values and the crops on the device,
so that it can be tested alone against the formulas of the paper. `dino_hf.training.trainer.train`
calls it once per step.

Nothing in a step reads a value back from the device (no `.item()`, no Python `if` on a tensor): the
loss and the diagnostics come back as 0-dim tensors that the caller reads when it logs, and a
non-finite loss is dealt with on the device, as AMP's gradient scaler deals with non-finite
gradients: the step still runs its kernels, but no weight, no optimiser state and not the center
change, and `nonfinite` says so.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from accelerate import Accelerator
from torch import nn

from ..models.heads import DinoHead
from ..objectives.dino import DinoLoss, collapse_diagnostics
from ..objectives.term import StudentOutputs, Term
from .optimization import clip_gradients_, step_unless_
from .teacher import ema_update_

NONFINITE_HINTS = (
    "likely causes: fp16 overflow (the reference's known NaN on ViT-S/8 and small data: use "
    "--mixed_precision bf16 or no), a teacher temperature above 0.07, a learning rate too high for the "
    "batch, or non-finite input images"
)


class _StepContext(NamedTuple):
    """What the forward and backward of every micro-batch of a step use: the models, the DINO loss and its
    weight, this step's teacher temperature, the accelerator, whether to compute the diagnostics, and the
    added terms (`dino_hf.objectives.term`: those of the batch, or of one micro-batch)."""

    student: nn.Module
    teacher: nn.Module
    dino_loss: DinoLoss
    teacher_temp: float
    accelerator: Accelerator | None
    diagnostics: bool
    terms: tuple[Term, ...]
    dino_weight: float


@dataclass(frozen=True)
class StepValues:
    """This step's values, from the run's plan (`TrainingPlan.step_values`): the schedules' lr, weight decay,
    teacher momentum and temperature (paper Sec. 3 and Appendix; `dino_hf.training.schedules`), the
    per-parameter clipping limit (3.0; 0 is off), whether the head's last layer is frozen (the first epoch) or
    the backbone (a head warm-up), the backbone's lr factor, the DINO loss's weight (0 in a distillation run:
    no teacher forward, head or center, and the crops may be the one view `[view (B, 3, G, G)]`), and whether
    to compute the `collapse_diagnostics` (read when the step is logged)."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    clip_grad: float = 3.0
    freeze_last_layer: bool = False
    freeze_backbone: bool = False
    backbone_lr_factor: float = 1.0
    dino_weight: float = 1.0
    diagnostics: bool = True


def train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    dino_loss: DinoLoss | None,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    values: StepValues,
    *,
    accelerator: Accelerator | None = None,
    accumulation_steps: int = 1,
    terms: Sequence[Term] = (),
) -> dict[str, torch.Tensor]:
    """One DINO step, in the reference's order: (1) lr (x each group's `lr_scale`, x `backbone_lr_factor`
    on the backbone's groups) and weight decay on the regularised groups; (2) per micro-batch, the teacher
    on the 2 global crops (no grad), the student on all crops, the loss with its added terms, backward of
    loss / accumulation_steps; (3) the centers, once, with the whole batch (2 x B/2 computes what 1 x B
    does); per-parameter clipping, frozen parts' gradients dropped, optimiser step; (4) the teacher's EMA.
    A loss that is not finite on any process leaves (3) and (4) as they were, decided on the device.

    Args:
        student, teacher: `MultiCropWrapper`s (the student possibly `accelerator.prepare`d; the teacher
            from `build_teacher(student)`, or None in a distillation run without an EMA network); `dino_loss`
            holds the center (None without the DINO loss); `optimizer` is built on
            `get_param_groups(student)` (its groups carry `regularized`, `lr_scale` and `backbone`).
        crops: `[global 1 (B, 3, G, G), global 2 (B, 3, G, G), local (B, 3, L, L) ...]` on the device.
        values: this step's `StepValues`.
        accelerator: autocast, backward, gradient sync on the last micro-batch only, unwrapping for the
            EMA. `accumulation_steps`: micro-batches of B / steps images, then one optimiser step.
        terms: the terms added to the DINO loss, in the order they are added (`dino_hf.objectives`: iBOT,
            KoLeo, the anchor's, distillation), each with its weights.

    Returns:
        0-dim tensors on the device, averaged over micro-batches and processes: `loss` (the DINO loss),
        each added term before weighting (`koleo`, `gram`, `anchor_cos`, `ibot`, `distill_global`,
        `distill_local`, when on), `total_loss` (the objective, when a term is added), the
        `collapse_diagnostics` (with DINO), `nonfinite` (1.0: skipped). Without DINO (`dino_weight` 0),
        `loss` is the objective.
    """
    for term in terms:
        crops = term.prepare(crops)
    _set_schedule(optimizer, values.lr, values.weight_decay, values.backbone_lr_factor)
    context = _StepContext(
        student,
        teacher,
        dino_loss,
        values.teacher_temp,
        accelerator,
        values.diagnostics,
        tuple(terms),
        values.dino_weight,
    )
    totals, teacher_output = _forward_backward_batch(context, crops, accumulation_steps)
    skip = _nonfinite(totals, terms)
    if values.dino_weight:
        # The center moves once per optimisation step, after the loss, with the mean over the whole batch
        # (every micro-batch was scored against the same center, as with 1 x B); not after a non-finite loss.
        dino_loss.update_center(teacher_output, keep=skip)
    for term in terms:
        term.after_step(skip)
    if values.dino_weight:
        _add_total_loss(totals, context)
    _prepare_gradients(student, optimizer, accelerator, values)
    _optimise_and_follow(student, teacher, optimizer, accelerator, values.momentum, skip)
    totals["nonfinite"] = skip.float()
    return totals


def _add_total_loss(totals: dict[str, torch.Tensor], context: _StepContext) -> None:
    """`total_loss`, the objective of a DINO step, when terms are added to the DINO loss or it is weighted."""
    added = [(name, weight) for term in context.terms for name, weight in term.weights.items()]
    if added or context.dino_weight != 1.0:
        loss = totals["loss"] if context.dino_weight == 1.0 else context.dino_weight * totals["loss"]
        totals["total_loss"] = loss + sum(weight * totals[name] for name, weight in added)


def _nonfinite(totals: dict[str, torch.Tensor], terms: Sequence[Term]) -> torch.Tensor:
    """Whether this step's loss (or a term added to it) is not finite, as a bool tensor on the device; the
    terms are means over the processes, so every process decides the same."""
    skip = ~torch.isfinite(totals["loss"])
    for name in (name for term in terms for name in term.weights):
        skip = skip | ~torch.isfinite(totals[name])
    return skip


def _optimise_and_follow(student, teacher, optimizer, accelerator, momentum: float, skip: torch.Tensor) -> None:
    """Optimiser step and teacher EMA (none without a teacher), both leaving everything as it was when `skip` is
    set."""
    step_unless_(optimizer, skip)
    optimizer.zero_grad(set_to_none=True)
    if teacher is None:
        return
    momentum = torch.where(skip, 1.0, momentum)  # 1 leaves the teacher as it is on a skipped step
    ema_update_(_unwrap(teacher, accelerator), _unwrap(student, accelerator), momentum)


def _prepare_gradients(student, optimizer, accelerator, values: StepValues) -> None:
    """Unscaled (fp16), clipped per parameter, and dropped where a part is frozen this step."""
    if accelerator is not None:
        accelerator.unscale_gradients(optimizer)
    clip_gradients_(student, values.clip_grad)
    if values.freeze_last_layer:
        for module in student.modules():
            if isinstance(module, DinoHead):
                module.cancel_last_layer_gradients_()
    if values.freeze_backbone:
        for p in _unwrap(student, accelerator).backbone.parameters():
            p.grad = None  # the optimiser skips parameters without a gradient


def _forward_backward_batch(context: _StepContext, crops, accumulation_steps: int):
    """Forward and backward of the batch in `accumulation_steps` micro-batches (gradients synced on the
    last one only), each with its terms (`Term.micro_batches`); returns the statistics averaged over them
    and the teacher output of the batch (None without DINO)."""
    batch = crops[0].shape[0]
    if batch % accumulation_steps:
        raise ValueError(
            f"batch of {batch} images does not split into {accumulation_steps} equal micro-batches; "
            f"use a batch that is a multiple of {accumulation_steps}"
        )
    micro_batches = list(zip(*(crop.chunk(accumulation_steps) for crop in crops)))
    micro_terms = list(zip(*(term.micro_batches(accumulation_steps) for term in context.terms)))
    accelerator = context.accelerator
    teacher_outputs, totals = [], {}
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or accelerator is None else accelerator.no_sync(context.student)
        terms = micro_terms[index] if micro_terms else ()
        with sync:
            stats, teacher_output = _forward_backward(
                context._replace(terms=terms), list(micro), 1.0 / accumulation_steps
            )
        teacher_outputs.append(teacher_output)
        for key, value in stats.items():
            totals[key] = totals[key] + value / accumulation_steps if key in totals else value / accumulation_steps
    return totals, torch.cat(teacher_outputs) if context.dino_weight else None


def _set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, backbone_lr_factor: float) -> None:
    """lr x `lr_scale` (x `backbone_lr_factor` for the backbone's groups) on every group, and the weight
    decay on the regularised ones. With the paper's settings both multipliers are 1.0: lr exactly."""
    for group in optimizer.param_groups:
        missing = [key for key in ("regularized", "lr_scale", "backbone") if key not in group]
        if missing:
            raise ValueError(
                f"optimizer parameter groups lack the key(s) {', '.join(repr(key) for key in missing)}; build them "
                "with dino_hf.training.optimization.get_param_groups(student)"
            )
        scale = group["lr_scale"] * backbone_lr_factor if group["backbone"] else group["lr_scale"]
        group["lr"] = lr * scale
        if group["regularized"]:
            group["weight_decay"] = weight_decay


def _unwrap(model: nn.Module, accelerator: Accelerator | None) -> nn.Module:
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _forward_backward(context: _StepContext, crops, scale: float):
    """Forward, loss and backward (of the objective x `scale`) of one micro-batch; returns its statistics
    (0-dim tensors) and the teacher output `(2 * B, K)` (None without DINO)."""
    accelerator = context.accelerator
    # Mixed precision covers the forwards and the loss, as the reference's autocast block.
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        if context.dino_weight:
            objective, stats, teacher_output = _dino_objective(context, crops)
        else:
            objective, stats, teacher_output = _terms_objective(context, crops)
    if accelerator is not None:
        accelerator.backward(objective * scale)
    else:
        (objective * scale).backward()
    return stats, teacher_output


def _dino_objective(context: _StepContext, crops):
    """The DINO loss (x `dino_weight`) with the terms added to it, the statistics (`loss` the DINO loss), and
    the teacher's output."""
    student, teacher, dino_loss, teacher_temp, accelerator = context[:5]
    teacher_options = _options(term.teacher_options() for term in context.terms)
    with torch.no_grad():  # (2 * B, K): the global crops; with iBOT also (M, K) at the masked patches
        teacher_output = teacher(crops[:2], **teacher_options)
    teacher_patch_logits = None
    if teacher_options:
        teacher_output, teacher_patch_logits = teacher_output
    outputs = _student_outputs(context, crops, heads=True)
    logits, outputs = outputs[0], outputs[1]._replace(teacher_patch_logits=teacher_patch_logits)
    terms = dino_loss.terms(logits, teacher_output, teacher_temp)
    stats = {}
    if context.diagnostics:
        stats.update(collapse_diagnostics(terms, dino_loss.center if dino_loss.uses_center else None))
    objective = terms.loss if context.dino_weight == 1.0 else context.dino_weight * terms.loss
    objective = _add_terms(objective, context, outputs, stats)
    stats = {"loss": _mean_over_processes(terms.loss, accelerator), **stats}
    return objective, stats, teacher_output.detach()


def _terms_objective(context: _StepContext, crops):
    """The added terms alone (no DINO loss, as a distillation run): the student without its head on the first
    crop, no teacher; `loss` is the objective."""
    _, outputs = _student_outputs(context, crops[:1], heads=False)
    stats = {}
    objective = _add_terms(0.0, context, outputs, stats)
    return objective, {"loss": _mean_over_processes(objective, context.accelerator), **stats}, None


def _add_terms(objective, context: _StepContext, outputs: StudentOutputs, stats: dict):
    """`objective` plus each term's values times their weights, in the terms' order; each value, averaged over
    the processes, goes into `stats`."""
    for term in context.terms:
        for name, value in term.values(outputs).items():
            objective = objective + term.weights[name] * value
            stats[name] = _mean_over_processes(value, context.accelerator)
    return objective


def _options(requests) -> dict:
    """The forward options that the terms ask for, merged: a flag is on when any term asks for it."""
    merged = {}
    for request in requests:
        for key, value in request.items():
            merged[key] = (merged.get(key, False) or value) if isinstance(value, bool) else value
    return {key: value for key, value in merged.items() if value is not False}


# Where the student's outputs go, in the order `MultiCropWrapper.forward` returns them after the logits.
_STUDENT_FIELDS = (("return_features", "features"), ("return_patch_tokens", "patch_tokens"))


def _student_outputs(context: _StepContext, crops, heads: bool) -> tuple:
    """The student's logits of all crops (None without `heads`) and what the terms asked for, as
    `StudentOutputs`. One backbone call per crop size serves them all."""
    options = _options(term.student_options() for term in context.terms)
    outputs = StudentOutputs(crops, context.teacher_temp, context.accelerator)
    if not options:
        return context.student(crops), outputs  # (ncrops * B, K)
    returned = context.student(crops, heads=heads, **options)
    fields = [heads, options.get("return_features"), options.get("return_patch_tokens")]
    fields += ["patch_indices" in options, options.get("project")]
    returned = list(returned) if sum(map(bool, fields)) > 1 else [returned]  # the wrapper returns one output bare
    logits = returned.pop(0) if heads else None
    taken = {field: returned.pop(0) for option, field in _STUDENT_FIELDS if options.get(option)}
    if "patch_indices" in options:
        taken["patch_logits"] = returned.pop(0)  # (M, K)
    if options.get("project"):
        # (B, D_t), (B, P, D_t); with several frozen models (`DistillHeads`), one such pair each
        taken["projected"] = returned.pop(0)
    return logits, outputs._replace(**taken)


def _mean_over_processes(loss: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """The loss averaged over the processes (a collective, not read back). A non-finite loss on one
    process is then seen by all, so that all of them skip the same step."""
    loss = loss.detach().float()
    if accelerator is None or accelerator.num_processes == 1:
        return loss
    return accelerator.reduce(loss, reduction="mean")


__all__ = ["NONFINITE_HINTS", "train_step"]
