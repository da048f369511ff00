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
from typing import NamedTuple

import torch
from accelerate import Accelerator
from torch import nn

from ..data.masks import PatchMasks
from ..models.heads import DinoHead
from .anchor import COSINE, GRAM, Anchor
from .distillation import GLOBAL, LOCAL, Distillation
from .ibot import IBOT, IBotLoss
from .loss import DinoLoss, collapse_diagnostics, koleo_loss
from .optimization import clip_gradients_, step_unless_
from .teacher import ema_update_

NONFINITE_HINTS = (
    "likely causes: fp16 overflow (the reference's known NaN on ViT-S/8 and small data: use "
    "--mixed_precision bf16 or no), a teacher temperature above 0.07, a learning rate too high for the "
    "batch, or non-finite input images"
)
# The terms a step may add to the DINO loss, in the order they are added; each is logged and checked
# for non-finite values.
REGULARISERS = (IBOT, "koleo", GRAM, COSINE)
DISTILLATION_TERMS = (GLOBAL, LOCAL)


class IBotStep(NamedTuple):
    """iBOT in a step: its loss (with the patch center), this step's weight, and the masks (of the
    batch, or of one micro-batch)."""

    loss: IBotLoss
    weight: float
    masks: PatchMasks


class _StepContext(NamedTuple):
    """What the forward and backward of every micro-batch of a step use: the models, the DINO loss, this
    step's teacher temperature, the accelerator, the added terms' weights (`_regulariser_weights`), the
    anchor, whether to compute the diagnostics, and iBOT (`IBotStep`, its masks those of the batch or of
    one micro-batch; or None)."""

    student: nn.Module
    teacher: nn.Module
    dino_loss: DinoLoss
    teacher_temp: float
    accelerator: Accelerator | None
    weights: dict[str, float]
    anchor: Anchor | None
    diagnostics: bool
    ibot: IBotStep | None
    dino_weight: float = 1.0
    distillation: Distillation | None = None


def train_step(
    student: nn.Module,
    teacher: nn.Module,
    dino_loss: DinoLoss,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    teacher_temp: float,
    clip_grad: float,
    freeze_last_layer: bool,
    accelerator: Accelerator | None = None,
    accumulation_steps: int = 1,
    freeze_backbone: bool = False,
    backbone_lr_factor: float = 1.0,
    koleo_weight: float = 0.0,
    anchor: Anchor | None = None,
    gram_weight: float = 0.0,
    anchor_cosine_weight: float = 0.0,
    diagnostics: bool = True,
    ibot_loss: IBotLoss | None = None,
    ibot_weight: float = 0.0,
    masks: PatchMasks | None = None,
    dino_weight: float = 1.0,
    distillation: Distillation | None = None,
) -> dict[str, torch.Tensor]:
    """One DINO step, in the reference's order: (1) lr (x each group's `lr_scale`, x `backbone_lr_factor`
    on the backbone's groups) and weight decay on the regularised groups; (2) per micro-batch, the teacher
    on the 2 global crops (no grad), the student on all crops, the loss with its added terms, backward of
    loss / accumulation_steps; (3) the centers, once, with the whole batch (2 x B/2 computes what 1 x B
    does); per-parameter clipping, frozen parts' gradients dropped, optimiser step; (4) the teacher's EMA.
    A loss that is not finite on any process leaves (3) and (4) as they were, decided on the device.

    Args:
        student, teacher: `MultiCropWrapper`s (the student possibly `accelerator.prepare`d; the teacher
            from `build_teacher(student)`); `dino_loss` holds the center; `optimizer` is built on
            `get_param_groups(student)` (its groups carry `regularized`, `lr_scale` and `backbone`).
        crops: `[global 1 (B, 3, G, G), global 2 (B, 3, G, G), local (B, 3, L, L) ...]` on the device.
        lr, weight_decay, momentum, teacher_temp, backbone_lr_factor: this step's schedule values.
        clip_grad: per-parameter gradient norm limit (3.0; 0 is off). `freeze_last_layer`: drop the
            head's last-layer gradients; `freeze_backbone`: train the head alone (head warm-up).
        accelerator: autocast, backward, gradient sync on the last micro-batch only, unwrapping for the
            EMA. `accumulation_steps`: micro-batches of B / steps images, then one optimiser step.
        diagnostics: compute the `collapse_diagnostics`. koleo_weight: DINOv2's KoLeo term's weight.
        anchor, gram_weight, anchor_cosine_weight: the Gram teacher (`dino_hf.training.anchor`) and the
            weights of its `gram` and `anchor_cos` terms (a weight of 0 still reports the term).
        ibot_loss, ibot_weight, masks: iBOT's loss with its patch center, its weight, and the batch's
            block masks for `accumulation_steps` micro-batches (the student's global crops are masked).
        dino_weight: the DINO loss's weight; 0 leaves out the teacher's forward, the head and the center
            (a distillation run), and the crops may then be the one view `[view (B, 3, G, G)]`.
        distillation: the term of feature distillation from a frozen model (`dino_hf.training.distillation`),
            on the first crop, with the student's `distill_projector`; its terms' weights are its own.

    Returns:
        0-dim tensors on the device, averaged over micro-batches and processes: `loss` (the DINO loss),
        each added term before weighting (`koleo`, `gram`, `anchor_cos`, `ibot`, `distill_global`,
        `distill_local`, when on), `total_loss` (the objective, when a term is added), the
        `collapse_diagnostics` (with DINO), `nonfinite` (1.0: skipped). Without DINO (`dino_weight` 0),
        `loss` is the objective.
    """
    weights = _regulariser_weights(koleo_weight, anchor, gram_weight, anchor_cosine_weight)
    ibot = _ibot_step(ibot_loss, ibot_weight, masks, accumulation_steps)
    if distillation is not None:
        crops = [distillation.prepare(crops[0]), *crops[1:]]
    _set_schedule(optimizer, lr, weight_decay, backbone_lr_factor)
    context = _StepContext(
        student, teacher, dino_loss, teacher_temp, accelerator, weights, anchor, diagnostics, ibot, dino_weight,
        distillation,
    )  # fmt: skip
    totals, teacher_output, teacher_patch_output = _forward_backward_batch(context, crops, accumulation_steps)
    skip = _nonfinite(totals)
    if dino_weight:
        _update_centers(dino_loss, ibot, teacher_output, teacher_patch_output, skip)
        _add_total_loss(totals, context)
    _prepare_gradients(student, optimizer, accelerator, clip_grad, freeze_last_layer, freeze_backbone)
    _optimise_and_follow(student, teacher, optimizer, accelerator, momentum, skip)
    totals["nonfinite"] = skip.float()
    return totals


def _add_total_loss(totals: dict[str, torch.Tensor], context: _StepContext) -> None:
    """`total_loss`, the objective of a DINO step, when terms are added to the DINO loss or it is weighted."""
    added = {**context.weights, **({IBOT: context.ibot.weight} if context.ibot is not None else {})}
    added.update(context.distillation.weights if context.distillation is not None else {})
    if added or context.dino_weight != 1.0:
        loss = totals["loss"] if context.dino_weight == 1.0 else context.dino_weight * totals["loss"]
        totals["total_loss"] = loss + sum(weight * totals[name] for name, weight in added.items())


def _update_centers(dino_loss, ibot, teacher_output, teacher_patch_output, skip: torch.Tensor) -> None:
    """The center moves once per optimisation step, after the loss, with the mean over the whole batch
    (every micro-batch was scored against the same center, as with 1 x B); not after a non-finite loss.
    iBOT's patch center likewise, over the masked patches of the whole batch."""
    dino_loss.update_center(teacher_output, keep=skip)
    if ibot is not None:
        ibot.loss.update_center(teacher_patch_output, ibot.masks.weights.flatten(), keep=skip)


def _regulariser_weights(koleo_weight: float, anchor: Anchor | None, gram_weight: float, cosine_weight: float):
    """The weight of each term the step adds to the DINO loss, by name (`REGULARISERS`): KoLeo when its
    weight is not 0, the anchor's terms whenever there is an anchor."""
    weights = {"koleo": koleo_weight} if koleo_weight else {}
    for name, weight in ((GRAM, gram_weight), (COSINE, cosine_weight)):
        if anchor is not None and name in anchor.term_names:
            weights[name] = weight
        elif weight:
            raise ValueError(
                f"a {name} weight of {weight} needs an anchor built with that term "
                "(dino_hf.training.anchor.build_anchor, --gram_loss_weight / --anchor_cosine_weight)"
            )
    return weights


def _ibot_step(
    ibot_loss: IBotLoss | None, weight: float, masks: PatchMasks | None, accumulation_steps: int
) -> IBotStep | None:
    """iBOT's part of the step, its inputs checked; None without an iBOT loss."""
    if ibot_loss is None:
        if weight or masks is not None:
            raise ValueError(
                "masks or an iBOT weight were given without an iBOT loss: pass ibot_loss "
                "(dino_hf.training.ibot.build_ibot_loss, --ibot_loss_weight > 0)"
            )
        return None
    if masks is None:
        raise ValueError("an iBOT loss needs the batch's masks: pass masks=batch['masks'] (drawn by the loader)")
    if len(masks.indices) != accumulation_steps:
        raise ValueError(
            f"the masks were drawn for {len(masks.indices)} micro-batches and the step makes {accumulation_steps}; "
            "build the loader's BlockMasking with micro_batches=accumulation_steps"
        )
    return IBotStep(ibot_loss, weight, masks)


def _nonfinite(totals: dict[str, torch.Tensor]) -> torch.Tensor:
    """Whether this step's loss (or a term added to it: iBOT, KoLeo, the anchor's, distillation's) is not
    finite, as a bool tensor on the device; the terms are means over the processes, so every process
    decides the same."""
    skip = ~torch.isfinite(totals["loss"])
    for name in (*REGULARISERS, *DISTILLATION_TERMS):
        if name in totals:
            skip = skip | ~torch.isfinite(totals[name])
    return skip


def _optimise_and_follow(student, teacher, optimizer, accelerator, momentum: float, skip: torch.Tensor) -> None:
    """Optimiser step and teacher EMA, both leaving everything as it was when `skip` is set."""
    step_unless_(optimizer, skip)
    optimizer.zero_grad(set_to_none=True)
    momentum = torch.where(skip, 1.0, momentum)  # 1 leaves the teacher as it is on a skipped step
    ema_update_(_unwrap(teacher, accelerator), _unwrap(student, accelerator), momentum)


def _prepare_gradients(student, optimizer, accelerator, clip_grad, freeze_last_layer, freeze_backbone) -> None:
    """Unscaled (fp16), clipped per parameter, and dropped where a part is frozen this step."""
    if accelerator is not None:
        accelerator.unscale_gradients(optimizer)
    clip_gradients_(student, clip_grad)
    if freeze_last_layer:
        for module in student.modules():
            if isinstance(module, DinoHead):
                module.cancel_last_layer_gradients_()
    if freeze_backbone:
        for p in _unwrap(student, accelerator).backbone.parameters():
            p.grad = None  # the optimiser skips parameters without a gradient


def _forward_backward_batch(context: _StepContext, crops, accumulation_steps: int):
    """Forward and backward of the batch in `accumulation_steps` micro-batches (gradients synced on the
    last one only); returns the statistics averaged over them, the teacher output of the batch and,
    with iBOT, the teacher's patch outputs of all micro-batches `(accumulation_steps * M, K)` (else None)."""
    batch = crops[0].shape[0]
    if batch % accumulation_steps:
        raise ValueError(
            f"batch of {batch} images does not split into {accumulation_steps} equal micro-batches; "
            f"use a batch that is a multiple of {accumulation_steps}"
        )
    micro_batches = list(zip(*(crop.chunk(accumulation_steps) for crop in crops)))
    ibot, accelerator = context.ibot, context.accelerator
    micro_contexts = [context] * accumulation_steps
    if ibot is not None:  # each micro-batch with its own masks
        micro_contexts = [context._replace(ibot=ibot._replace(masks=masks)) for masks in ibot.masks.micro_batches()]
    teacher_outputs, teacher_patch_outputs, totals = [], [], {}
    if not context.dino_weight:
        teacher_outputs = None
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or accelerator is None else accelerator.no_sync(context.student)
        with sync:
            stats, teacher_output, teacher_patch_output = _forward_backward(
                micro_contexts[index], list(micro), 1.0 / accumulation_steps
            )
        if teacher_outputs is not None:
            teacher_outputs.append(teacher_output)
            teacher_patch_outputs.append(teacher_patch_output)
        for key, value in stats.items():
            totals[key] = totals[key] + value / accumulation_steps if key in totals else value / accumulation_steps
    if teacher_outputs is None:
        return totals, None, None
    return totals, torch.cat(teacher_outputs), None if ibot is None else torch.cat(teacher_patch_outputs)


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
    (0-dim tensors), the teacher output `(2 * B, K)` and, with iBOT, the teacher's patch outputs `(M, K)`
    at the micro-batch's masked patches (else None; both None without DINO). `context.ibot` holds this
    micro-batch's masks."""
    accelerator = context.accelerator
    # Mixed precision covers the forwards and the loss, as the reference's autocast block.
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        if context.dino_weight:
            objective, stats, teacher_output, teacher_patch_output = _dino_objective(context, crops)
        else:
            objective, stats, teacher_output, teacher_patch_output = _distillation_objective(context, crops)
    if accelerator is not None:
        accelerator.backward(objective * scale)
    else:
        (objective * scale).backward()
    return stats, teacher_output, teacher_patch_output


def _dino_objective(context: _StepContext, crops):
    """The DINO loss (x `dino_weight`) with its added terms, their statistics (`loss` the DINO loss), and the
    teacher's outputs."""
    student, teacher, dino_loss, teacher_temp, accelerator, weights, anchor, diagnostics, ibot = context[:9]
    distillation = context.distillation
    stats = {}
    with torch.no_grad():
        if ibot is None:
            teacher_output, teacher_patch_output = teacher(crops[:2]), None  # (2 * B, K): the global crops
        else:  # and (M, K) at the masked patches, of the whole crops
            teacher_output, teacher_patch_output = teacher(crops[:2], patch_indices=ibot.masks.indices[0])
    gram = anchor is not None and anchor.gram
    if weights or ibot is not None or distillation is not None:
        # (ncrops * B, K); (ncrops * B, D), for the Gram loss the first group's (2 * B, P, C), for iBOT
        # (M, K) at the masked patches and for distillation the first crop's projected outputs, each or None
        student_output, features, patch_tokens, student_patch_output, projected = _student_outputs(
            student, crops, bool(weights), gram, ibot, distillation is not None
        )
    else:
        student_output = student(crops)  # (ncrops * B, K)
    terms = dino_loss.terms(student_output, teacher_output, teacher_temp)
    if diagnostics:
        stats.update(collapse_diagnostics(terms, dino_loss.center if dino_loss.uses_center else None))
    objective = terms.loss if context.dino_weight == 1.0 else context.dino_weight * terms.loss
    if ibot is not None:
        value = ibot.loss(
            student_patch_output, teacher_patch_output, ibot.masks.weights[0], teacher_temp, 2 * len(crops[0])
        )
        objective = objective + ibot.weight * value
        stats[IBOT] = _mean_over_processes(value, accelerator)
    if weights:
        global_features = features[: 2 * len(crops[0])]  # (2 * B, D), as DINOv2's CLS tokens
        regularisers = _regularisers(weights, anchor, crops, global_features, patch_tokens)
        for name, value in regularisers.items():
            objective = objective + weights[name] * value
            stats[name] = _mean_over_processes(value, accelerator)
    if distillation is not None:
        objective = objective + _distillation_terms(context, crops[0], projected, stats)
    stats = {"loss": _mean_over_processes(terms.loss, accelerator), **stats}
    return objective, stats, teacher_output.detach(), teacher_patch_output


def _distillation_objective(context: _StepContext, crops):
    """Distillation alone (no DINO loss): the student's backbone and projectors on the first crop, no head,
    no teacher; `loss` is the objective."""
    projected = context.student(crops[:1], heads=False, project=True)  # (B, D_t), (B, P, D_t)
    stats = {}
    objective = _distillation_terms(context, crops[0], projected, stats)
    return objective, {"loss": _mean_over_processes(objective, context.accelerator), **stats}, None, None


def _distillation_terms(context: _StepContext, view: torch.Tensor, projected, stats: dict) -> torch.Tensor:
    """The weighted sum of the distillation's terms of `view`; each term's value goes into `stats`."""
    distillation = context.distillation
    values = distillation(view, *projected, context.accelerator)
    for name, value in values.items():
        stats[name] = _mean_over_processes(value, context.accelerator)
    return sum(distillation.weights[name] * value for name, value in values.items())


def _student_outputs(
    student, crops, features: bool, patch_tokens: bool, ibot: IBotStep | None, project: bool = False
) -> tuple:
    """The student's logits of all crops and, each when asked (else None), its backbone features, the
    first group's patch tokens, with iBOT the patch head's logits `(M, K)` at the masked patches of the
    masked global crops, and the projected features and patch tokens of the first crop (a pair, for
    distillation). One backbone call per crop size serves them all."""
    options = {"return_features": features, "return_patch_tokens": patch_tokens, "project": project}
    if ibot is not None:
        options.update(bool_masked_pos=ibot.masks.crop_masks(), patch_indices=ibot.masks.indices[0])
    outputs = list(student(crops, **options))
    logits = outputs.pop(0)
    asked = (features, patch_tokens, ibot is not None)
    taken = [outputs.pop(0) if wanted else None for wanted in asked]
    return (logits, *taken, tuple(outputs) if project else None)


def _regularisers(weights, anchor, crops, global_features, patch_tokens) -> dict[str, torch.Tensor]:
    """The terms named in `weights`, before weighting: KoLeo of each global crop's features, summed over
    the 2 crops, and the anchor's terms of the 2 global crops (`patch_tokens`: the student's, first
    group of crops, of which the global crops are the first 2 * B rows)."""
    values = {}
    if "koleo" in weights:
        values["koleo"] = sum(koleo_loss(crop_features) for crop_features in global_features.chunk(2))
    if anchor is not None:
        global_patch_tokens = patch_tokens[: len(global_features)] if patch_tokens is not None else None
        values.update(anchor.terms(torch.cat(crops[:2]), global_features, global_patch_tokens))
    return values


def _mean_over_processes(loss: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """The loss averaged over the processes (a collective, not read back). A non-finite loss on one
    process is then seen by all, so that all of them skip the same step."""
    loss = loss.detach().float()
    if accelerator is None or accelerator.num_processes == 1:
        return loss
    return accelerator.reduce(loss, reduction="mean")


__all__ = ["NONFINITE_HINTS", "train_step"]
