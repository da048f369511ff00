"""The objectives a run's settings turn on, built from them: the anchor and its snapshots, iBOT's loss and
its masks.

The objectives themselves are `dino_hf.objectives`' and know nothing of the settings.
"""

from torch import nn

from ..data.masks import BlockMasking
from ..objectives.anchor import Anchor, GramSnapshots
from ..objectives.ibot import IBotLoss
from .arguments import DinoTrainingArguments


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


__all__ = ["gram_snapshots", "build_anchor", "build_ibot_loss", "build_masking"]
