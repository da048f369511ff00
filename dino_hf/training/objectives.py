"""The objectives a run's settings turn on, built from them: the anchor and its snapshots, iBOT's loss and
its masks, distillation from one or several frozen models (and the checks of a resumed distillation).

The objectives themselves are `dino_hf.objectives`' and know nothing of the settings.
"""

import json
from pathlib import Path

from torch import nn

from ..convert.zero_shot import text_side_refusal
from ..data.masks import BlockMasking
from ..models.normalization import Normalization
from ..objectives.anchor import Anchor, GramSnapshots
from ..objectives.balancing import build_balancing
from ..objectives.distillation import GLOBAL, LOCAL, Distillation, FrozenModel, queue_size_for
from ..objectives.ibot import IBotLoss
from ..objectives.multi_distillation import MultiDistillation, Teacher, teacher_names
from ..run_files.checkpoints import DISTILL_FILE
from .arguments import DinoTrainingArguments, several_teachers, teacher_sizes, teacher_weights
from .networks import frozen_widths


def build_anchor(args: DinoTrainingArguments, backbone: nn.Module) -> Anchor | None:
    """The run's anchor, a copy of `backbone` as it is now (before the first step), or None when
    `--gram_loss_weight` and `--anchor_cosine_weight` are both 0. With `--gram_teacher ema` the copy
    holds the place of the first snapshot of the EMA teacher (`GramSnapshots`).

    Raises:
        ValueError: the Gram teacher's crops (`--gram_teacher_resolution_scale`) are a size that a
            transformers backbone cannot take (the patch size of the other ViTs is checked with the
            crop sizes, `dino_hf.training.arguments.check_crop_sizes`).
    """
    if not (args.gram_loss_weight or args.anchor_cosine_weight):
        return None
    anchor = Anchor(
        backbone,
        gram=args.gram_loss_weight > 0,
        cosine=args.anchor_cosine_weight > 0,
        remove_neg=args.gram_remove_neg,
        resolution_scale=args.gram_teacher_resolution_scale,
        snapshot_step=0 if args.gram_teacher == "start" else None,
    )
    check_input_size = getattr(anchor.backbone, "check_input_size", None)
    if args.gram_teacher_resolution_scale != 1 and check_input_size is not None:
        check_input_size(
            args.gram_teacher_crops_size,
            f"the Gram teacher's crop size (--global_crops_size {args.global_crops_size} x "
            f"--gram_teacher_resolution_scale {args.gram_teacher_resolution_scale:g})",
        )
    return anchor


def build_ibot_loss(args: DinoTrainingArguments) -> IBotLoss | None:
    """The run's iBOT loss (on the DINO loss's temperatures, center momentum and centering), or None
    when `--ibot_loss_weight` is 0."""
    if not args.ibot_loss_weight:
        return None
    return IBotLoss(
        args.out_dim,
        student_temp=args.student_temp,
        center_momentum=args.center_momentum,
        centering=args.centering,
        sinkhorn_iterations=args.sinkhorn_iterations,
    )


def build_masking(args: DinoTrainingArguments, backbone: nn.Module) -> BlockMasking | None:
    """How the run's batches are masked, or None when `--ibot_loss_weight` is 0. The patch grid is the
    global crop size over the backbone's patch size; each micro-batch of `per_device_train_batch_size`
    images is masked on its own."""
    if not args.ibot_loss_weight:
        return None
    patch_size = backbone.model.config.patch_size
    patch_size = int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)
    side = args.global_crops_size // patch_size
    return BlockMasking(
        grid=(side, side),
        ratio_min_max=tuple(args.mask_ratio_min_max),
        sample_probability=args.mask_sample_probability,
        micro_batches=args.gradient_accumulation_steps,
    )


def gram_snapshots(args: DinoTrainingArguments) -> GramSnapshots | None:
    """The schedule of `--gram_teacher ema`; None for the start (taken once, before the first step)
    or when the Gram loss is off."""
    if args.gram_teacher != "ema" or not args.gram_loss_weight:
        return None
    return GramSnapshots(args.gram_start_step, args.gram_update_steps, args.gram_max_updates)


def _single_distillation(
    args: DinoTrainingArguments, frozen_backbone: nn.Module, normalization: Normalization, samples: int | None
) -> Distillation:
    """The single-teacher term: the frozen model reading the student's crops, the queue sized by the data."""
    frozen = FrozenModel(frozen_backbone, args.distill_from[0], normalization, teacher_sizes(args)[0])
    return Distillation(
        frozen,
        args.distill_queue_size or queue_size_for(samples),
        global_weight=args.distill_global_weight,
        local_weight=args.distill_local_weight,
        local_loss=args.distill_local_loss,
        mixup=args.distill_mixup,
    )


def _single_distillation_line(args: DinoTrainingArguments, distillation: Distillation, precision: str) -> str:
    """What a single-teacher run scores and exports, in one line."""
    frozen = distillation.frozen
    size = teacher_sizes(args)[0] or args.global_crops_size
    terms = []
    if GLOBAL in distillation.weights:
        queue, weight = len(distillation.queue.features), distillation.weights[GLOBAL]
        terms.append(f"{GLOBAL} (queue KL over {queue} features, weight {weight:g})")
    if LOCAL in distillation.weights:
        kind = "patch-similarity KL" if distillation.local_loss == "similarity" else "patch cosine regression"
        terms.append(f"{LOCAL} ({kind}, weight {distillation.weights[LOCAL]:g})")
    exported = "an EMA of the student (--distill_ema_student)" if args.distill_ema_student else "the student"
    return (
        f"distillation: the frozen {frozen.name} sees the view at {size} px in {precision or 'no'} precision; "
        f"{', '.join(terms)}; mixup {'on' if distillation.mixup else 'off'}; exports {exported} as student_backbone"
    )


def _load_single_distillation(distillation: Distillation, saved: tuple[dict, dict] | None, folder: Path) -> None:
    """The queue of the checkpoint's run, after checking that it distilled the same frozen model.

    Raises:
        ValueError: the checkpoint's run distilled another model (name or weights), or none.
    """
    frozen = distillation.frozen
    if saved is None:
        raise ValueError(
            f"{folder} has no {DISTILL_FILE}: its run did not distil a frozen model, and this one distils "
            f"{frozen.name}; resume without --distill_from, or start a new run from it with --init_from_checkpoint"
        )
    tensors, metadata = saved
    if metadata.get("sha256") != frozen.sha256:
        raise ValueError(
            f"{folder} was trained against {metadata.get('distill_from')!r} (weights sha256 "
            f"{str(metadata.get('sha256'))[:12]}...), and this run's --distill_from {frozen.name!r} has other weights "
            f"(sha256 {frozen.sha256[:12]}...); resume with the model the run started with, or start a new run"
        )
    if tensors["features"].shape != distillation.queue.features.shape:
        raise ValueError(
            f"{folder} holds a queue of {tuple(tensors['features'].shape)} and this run builds "
            f"{tuple(distillation.queue.features.shape)}; resume with the run's --distill_queue_size "
            "(its training_args.json)"
        )
    distillation.load_state_dict(tensors)


def distill_targets(args: DinoTrainingArguments, frozen_backbones: list[nn.Module]) -> list[tuple[int, int, bool]]:
    """Per frozen model, what the student's heads map to: the widths of its global feature and of its patch
    tokens, and whether its global feature is text-aligned (`networks.build_student_teacher`)."""
    return [
        (*frozen_widths(backbone, size or args.global_crops_size), bool(getattr(backbone, "text_aligned", False)))
        for backbone, size in zip(frozen_backbones, teacher_sizes(args), strict=True)
    ]


def build_distillation(
    args: DinoTrainingArguments,
    frozen_backbones: list[nn.Module],
    heads: nn.Module,
    normalization: Normalization,
    samples: int | None,
) -> Distillation | MultiDistillation:
    """The distillation term of the run: the single-teacher objective of one frozen model
    (`dino_hf.objectives.distillation`), or, with several or with their options (`several_teachers`), RADIO's
    (`dino_hf.objectives.multi_distillation`): each frozen model reading the student's view at its size and in its
    normalisation, its weight, and the balancing of its patch features (fitted by `fit_balancing`). `heads`: the
    student's `distill_projector`, whose widths are each frozen model's.

    Raises:
        ValueError: `--distill_zero_shot` without a frozen model that has a text tower.
    """
    if not several_teachers(args):
        return _single_distillation(args, frozen_backbones[0], normalization, samples)
    teachers = []
    for backbone, spec, name, weight, size, projector in zip(
        frozen_backbones,
        args.distill_from,
        teacher_names(args.distill_from),
        teacher_weights(args),
        teacher_sizes(args),
        heads,
        strict=True,
    ):
        summary_dim, patch_dim = projector.out_dims
        frozen = FrozenModel(backbone, spec, normalization, size)
        balancing = build_balancing(args.distill_balancing, patch_dim)
        teachers.append(Teacher(frozen, name, weight, balancing, summary_dim, patch_dim))
    if args.distill_zero_shot and zero_shot_teacher(teachers) is None:
        raise ValueError(
            f"--distill_zero_shot exports the student with a frozen model's text tower, and none of "
            f"{', '.join(args.distill_from)} has one it can export; name a CLIP folder or Hub id (the whole "
            "model, image and text towers) in --distill_from, or leave --distill_zero_shot out"
        )
    return MultiDistillation(
        teachers,
        global_weight=args.distill_global_weight,
        local_weight=args.distill_local_weight,
        global_loss=args.distill_global_loss,
        local_loss=args.distill_local_loss,
        queue_size=args.distill_queue_size or queue_size_for(samples),
        drop_probability=args.distill_teacher_drop,
    )


def zero_shot_teacher(teachers: list[Teacher]) -> Teacher | None:
    """The first frozen model whose global feature is aligned with a text tower that its folder holds, in a layout
    the zero-shot export takes (`dino_hf.convert.zero_shot.text_side_refusal`)."""
    return next((teacher for teacher in teachers if teacher.text_aligned and _exports_text(teacher)), None)


def _exports_text(teacher: Teacher) -> bool:
    return text_side_refusal(teacher.frozen.source) is None


def distillation_line(
    args: DinoTrainingArguments, distillation: Distillation | MultiDistillation, precision: str | None
) -> str:
    """What a distillation run scores and exports, in one line."""
    if isinstance(distillation, Distillation):
        return _single_distillation_line(args, distillation, precision)
    teachers = ", ".join(_teacher_text(args, teacher) for teacher in distillation.teachers)
    global_loss = "1 - cosine" if distillation.global_loss == "cosine" else "queue KL"
    local_loss = "0.9 cosine + 0.1 smooth-L1" if distillation.local_loss == "cosine" else "patch-similarity KL"
    dropping = (
        f"teacher dropping p={args.distill_teacher_drop:g}" if args.distill_teacher_drop else "no teacher dropping"
    )
    exported = "an EMA of the student (--distill_ema_student)" if args.distill_ema_student else "the student"
    zero_shot = ", student_zero_shot" if args.distill_zero_shot else ""
    return (
        f"distillation from {len(distillation.teachers)} frozen models in {precision or 'no'} precision: {teachers}; "
        f"summary {global_loss} (weight {args.distill_global_weight:g}), features {local_loss} (weight "
        f"{args.distill_local_weight:g}) after {args.distill_balancing} balancing; {dropping}; exports {exported} as "
        f"student_backbone, student_heads{zero_shot}"
    )


def _teacher_text(args: DinoTrainingArguments, teacher: Teacher) -> str:
    size = teacher.frozen.input_size or args.global_crops_size
    aligned = ", text-aligned" if teacher.text_aligned else ""
    return (
        f"{teacher.name} ({teacher.frozen.name} at {size} px, weight {teacher.weight:g}, "
        f"{teacher.summary_dim} / {teacher.patch_dim} wide{aligned})"
    )


def fit_balancing(distillation: MultiDistillation, batches, count: int, accelerator) -> int:
    """Fit the balancing of every frozen model's patch features on the next `count` batches' views (every
    process's); returns the batches read (0 when there is nothing to fit: `"none"`, or a resumed run whose
    statistics came with its checkpoint)."""
    if distillation.fitted:
        return 0
    for _ in range(count):
        crops, _ = next(batches)
        distillation.observe(crops[0], accelerator)
    distillation.fit()
    return count


def load_distillation(distillation, saved: tuple[dict, dict] | None, folder: Path) -> None:
    """The distillation state of the checkpoint's run (queues, balancing statistics), after checking that it
    distilled the same frozen models, in the same order, with the same weights.

    Raises:
        ValueError: the checkpoint's run distilled other models (names, weights, order or weight hashes), or none.
    """
    if isinstance(distillation, Distillation):
        if saved is not None and "teachers" in saved[1]:
            raise ValueError(_teachers_changed(folder, json.loads(saved[1]["teachers"]), "one frozen model"))
        _load_single_distillation(distillation, saved, folder)
        return
    if saved is None:
        raise ValueError(
            f"{folder} has no {DISTILL_FILE}: its run did not distil, and this one distils "
            f"{', '.join(teacher.frozen.name for teacher in distillation.teachers)}; start a new run from it with "
            "--init_from_checkpoint"
        )
    tensors, metadata = saved
    recorded = json.loads(metadata["teachers"]) if "teachers" in metadata else [metadata]
    expected = json.loads(distillation.metadata()["teachers"])
    ours = [(t["source"], t["sha256"], t["weight"]) for t in expected]
    theirs = [(t.get("source", t.get("distill_from")), t.get("sha256"), t.get("weight", 1.0)) for t in recorded]
    if ours != theirs:
        described = ", ".join(
            f"{t.get('source', t.get('distill_from'))} (weight {t.get('weight', 1.0):g})" for t in recorded
        )
        raise ValueError(_teachers_changed(folder, recorded, described))
    distillation.load_state_dict(tensors)


def _teachers_changed(folder: Path, recorded: list[dict], described: str) -> str:
    return (
        f"{folder} was trained distilling {described}, and this run's --distill_from / --distill_weights (or those "
        "models' weights) differ; resume with the frozen models of the run that wrote it, in the same order and with "
        "the same weights (its training_args.json), or start a new run from it with --init_from_checkpoint"
    )


__all__ = [
    "build_distillation",
    "distill_targets",
    "distillation_line",
    "fit_balancing",
    "load_distillation",
    "zero_shot_teacher",
    "gram_snapshots",
    "build_anchor",
    "build_ibot_loss",
    "build_masking",
]
