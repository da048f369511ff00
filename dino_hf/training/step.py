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


class IBotStep(NamedTuple):
    """iBOT in a step: its loss (with the patch center), this step's weight, and the masks (of the
    batch, or of one micro-batch)."""

    loss: IBotLoss
    weight: float
    masks: PatchMasks


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
) -> dict[str, torch.Tensor]:
    """One DINO step, in the reference's order.

    1. lr on every parameter group (times the group's `lr_scale`, and `backbone_lr_factor` for the
       backbone's groups), weight decay on the regularised group(s) only;
    2. per micro-batch: teacher on the 2 global crops (no grad), student on all crops, loss (plus
       `koleo_weight` times the KoLeo term and the anchor's weighted terms when they are on), backward
       of loss / accumulation_steps; the center is updated once, after the last micro-batch, with the
       mean teacher output of the whole batch (so 2 x B/2 computes what 1 x B does);
    3. per-parameter gradient clipping, last-layer gradients dropped when `freeze_last_layer`,
       backbone gradients dropped when `freeze_backbone`, optimiser step, zero_grad;
    4. EMA of the teacher with `momentum`.

    When the loss is not finite on any process (in any micro-batch), steps 2 (the center), 3 (the
    optimiser) and 4 leave everything as it was, decided on the device.

    Args:
        student (`nn.Module`): `MultiCropWrapper` (possibly wrapped by `accelerator.prepare`).
        teacher (`nn.Module`): from `build_teacher(student)`.
        dino_loss (`DinoLoss`): holds the center.
        optimizer: built on `get_param_groups(student)` (the groups carry the `regularized` flag).
        crops (`list[torch.Tensor]`): `[global 1 (B, 3, G, G), global 2 (B, 3, G, G), local
            (B, 3, L, L) ...]`, already on the device.
        lr, weight_decay, momentum, teacher_temp (`float`): this step's schedule values
            (`dino_hf.training.schedules`).
        clip_grad (`float`): per-parameter gradient norm limit (3.0); 0 turns clipping off.
        freeze_last_layer (`bool`): drop the head's last-layer gradients (during the first
            `freeze_last_layer` epochs).
        accelerator (`accelerate.Accelerator`, optional): autocast, backward (and unscaling of fp16
            gradients before clipping), gradient sync only on the last micro-batch, and unwrapping
            of the models for the EMA.
        accumulation_steps (`int`): split the batch into this many micro-batches of B / steps images,
            one forward and backward each, then one optimiser step (gradient accumulation).
        freeze_backbone (`bool`): train the head alone (warm-up of a fresh head on pretrained weights).
        backbone_lr_factor (`float`, defaults to 1.0): this step's multiplier of the backbone groups' lr
            (`schedules.backbone_lr_factor_at`: 0 during the head warm-up, then the backbone's own
            linear warm-up to 1).
        diagnostics (`bool`, defaults to `True`): compute the `collapse_diagnostics`; a caller that only
            reads them at logging steps turns them off in between.
        koleo_weight (`float`, defaults to 0.0): weight of the KoLeo regulariser (DINOv2 Sec. 4; 0.1
            there) added to the loss: `koleo_loss` of the student's backbone features of each global
            crop, summed over the 2 global crops, within each process's micro-batch as DINOv2 does
            within each GPU's batch. 0 turns it off (the paper's loss).
        anchor (`Anchor`, optional): the frozen Gram teacher (the starting backbone, or a snapshot of
            the EMA teacher; `dino_hf.training.anchor`); it sees the global crops of each micro-batch
            (resized by its `resolution_scale`) and gives the terms it was built for, `gram` (DINOv3's
            Gram loss of the global crops' patch tokens) and / or `anchor_cos` (1 - cos of the global
            features). None (the default) computes neither (the paper's loss).
        gram_weight, anchor_cosine_weight (`float`, defaults to 0.0): this step's weights of the
            anchor's `gram` and `anchor_cos` terms in the objective (0 at the start of the Gram warm-up:
            the term is still computed and reported). A weight above 0 needs an anchor with that term.
        ibot_loss (`IBotLoss`, optional): iBOT's masked-patch loss (`dino_hf.training.ibot`) with its
            patch center, which is updated after the loss like the DINO center (once per step, with all
            micro-batches' masked patches; not on a skipped step). None (the default) is the paper's loss.
        ibot_weight (`float`, defaults to 0.0): its weight in the objective (DINOv2: 1.0); it needs
            `ibot_loss`.
        masks (`PatchMasks`, optional): the batch's block masks, on the device (`batch["masks"]`), drawn
            for `accumulation_steps` micro-batches; with `ibot_loss` the student's global crops are
            masked, each micro-batch with its own masks, and the iBOT loss is computed per micro-batch.

    Returns:
        0-dim tensors on the device: `loss` (the DINO loss, averaged over the micro-batches and the
        processes), `koleo` (the KoLeo term before weighting, averaged the same way; only when
        `koleo_weight` is not 0), `gram` and `anchor_cos` (likewise, the terms the anchor computes;
        only with an anchor), `ibot` (the iBOT term before weighting; only with `ibot_loss`), `total_loss`
        (the objective: `loss` plus each added term times its weight; only when a term is added), the
        `collapse_diagnostics`, and `nonfinite` (1.0 when the step was skipped, else 0.0).
    """
    weights = _regulariser_weights(koleo_weight, anchor, gram_weight, anchor_cosine_weight)
    ibot = _ibot_step(ibot_loss, ibot_weight, masks, accumulation_steps)
    _set_schedule(optimizer, lr, weight_decay, backbone_lr_factor)
    totals, teacher_output, teacher_patch_output = _forward_backward_batch(
        student,
        teacher,
        dino_loss,
        crops,
        teacher_temp,
        accelerator,
        accumulation_steps,
        weights,
        anchor,
        diagnostics,
        ibot,
    )
    skip = _nonfinite(totals)
    # The center moves once per optimisation step, after the loss, with the mean over the whole batch
    # (every micro-batch was scored against the same center, as with 1 x B); not after a non-finite loss.
    dino_loss.update_center(teacher_output, keep=skip)
    if ibot is not None:  # the patch center likewise, over the masked patches of the whole batch
        ibot.loss.update_center(teacher_patch_output, ibot.masks.weights.flatten(), keep=skip)
    if weights or ibot is not None:
        added = {**weights, **({IBOT: ibot.weight} if ibot is not None else {})}
        totals["total_loss"] = totals["loss"] + sum(weight * totals[name] for name, weight in added.items())
    _prepare_gradients(student, optimizer, accelerator, clip_grad, freeze_last_layer, freeze_backbone)
    _optimise_and_follow(student, teacher, optimizer, accelerator, momentum, skip)
    totals["nonfinite"] = skip.float()
    return totals


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
    """Whether this step's loss (or a term added to it: iBOT, KoLeo, the anchor's) is not finite, as a bool
    tensor on the device; the terms are means over the processes, so every process decides the same."""
    skip = ~torch.isfinite(totals["loss"])
    for name in REGULARISERS:
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


def _forward_backward_batch(
    student,
    teacher,
    dino_loss,
    crops,
    teacher_temp,
    accelerator,
    accumulation_steps,
    weights,
    anchor,
    diagnostics,
    ibot=None,
):
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
    micro_ibot = [None] * accumulation_steps
    if ibot is not None:  # each micro-batch with its own masks
        micro_ibot = [ibot._replace(masks=masks) for masks in ibot.masks.micro_batches()]
    teacher_outputs, teacher_patch_outputs, totals = [], [], {}
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or accelerator is None else accelerator.no_sync(student)
        with sync:
            stats, teacher_output, teacher_patch_output = _forward_backward(
                student,
                teacher,
                dino_loss,
                list(micro),
                teacher_temp,
                accelerator,
                1.0 / accumulation_steps,
                weights,
                anchor,
                diagnostics,
                micro_ibot[index],
            )
        teacher_outputs.append(teacher_output)
        teacher_patch_outputs.append(teacher_patch_output)
        for key, value in stats.items():
            totals[key] = totals[key] + value / accumulation_steps if key in totals else value / accumulation_steps
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


def _forward_backward(
    student, teacher, dino_loss, crops, teacher_temp, accelerator, scale, weights, anchor, diagnostics, ibot=None
):
    """Forward, loss and backward of one micro-batch; returns its statistics (0-dim tensors), the
    teacher output `(2 * B, K)` and, with iBOT, the teacher's patch outputs `(M, K)` at the micro-batch's
    masked patches (else None). `weights`: the terms added to the DINO loss (`_regulariser_weights`);
    `ibot`: the `IBotStep` with this micro-batch's masks, or None."""
    stats = {}
    # Mixed precision covers the forwards and the loss, as the reference's autocast block.
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        with torch.no_grad():
            if ibot is None:
                teacher_output, teacher_patch_output = teacher(crops[:2]), None  # (2 * B, K): the global crops
            else:  # and (M, K) at the masked patches, of the whole crops
                teacher_output, teacher_patch_output = teacher(crops[:2], patch_indices=ibot.masks.indices[0])
        gram = anchor is not None and anchor.gram
        if weights or ibot is not None:
            # (ncrops * B, K); (ncrops * B, D), for the Gram loss the first group's (2 * B, P, C) and for
            # iBOT (M, K) at the masked patches, each or None
            student_output, features, patch_tokens, student_patch_output = _student_outputs(
                student, crops, bool(weights), gram, ibot
            )
        else:
            student_output = student(crops)  # (ncrops * B, K)
        terms = dino_loss.terms(student_output, teacher_output, teacher_temp)
        if diagnostics:
            stats.update(collapse_diagnostics(terms, dino_loss.center if dino_loss.uses_center else None))
        objective = terms.loss
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
    if accelerator is not None:
        accelerator.backward(objective * scale)
    else:
        (objective * scale).backward()
    stats = {"loss": _mean_over_processes(terms.loss, accelerator), **stats}
    return stats, teacher_output.detach(), teacher_patch_output


def _student_outputs(student, crops, features: bool, patch_tokens: bool, ibot: IBotStep | None) -> tuple:
    """The student's logits of all crops and, each when asked (else None), its backbone features, the
    first group's patch tokens and, with iBOT, the patch head's logits `(M, K)` at the masked patches of
    the masked global crops. One backbone call per crop size serves them all."""
    options = {"return_features": features, "return_patch_tokens": patch_tokens}
    if ibot is not None:
        options.update(bool_masked_pos=ibot.masks.crop_masks(), patch_indices=ibot.masks.indices[0])
    outputs = list(student(crops, **options))
    logits = outputs.pop(0)
    asked = (features, patch_tokens, ibot is not None)
    return (logits, *(outputs.pop(0) if wanted else None for wanted in asked))


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
