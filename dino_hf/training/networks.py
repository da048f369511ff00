"""The student and teacher networks of a run, built from its training arguments."""

import os

import torch
from torch import nn

from ..convert.conversions import dino_from_reference
from ..models.backbones import TimmBackbone, build_backbone
from ..models.configuration_dino import PRESETS
from ..models.distill_projector import DistillHeads, DistillProjector
from ..models.heads import DinoHead
from ..models.lora import add_lora_, hold_base_in_, shared_parameters
from ..models.multicrop_wrapper import MultiCropWrapper
from ..models.references import TIMM_PREFIX, unreachable_model_message
from ..models.transformers_backbone import TransformersBackbone
from ..models.weight_files import load_checkpoint_file
from .arguments import (
    DinoTrainingArguments,
    check_crop_sizes,
    dino_on,
    lora_on,
    model_spec,
    preset_overrides,
    several_teachers,
    teacher_sizes,
)
from .teacher import build_teacher


def build_student_teacher(
    args: DinoTrainingArguments, distill_targets: list[tuple] | None = None, base_dtype: torch.dtype | None = None
) -> tuple[MultiCropWrapper, MultiCropWrapper | None, bool]:
    """Student = backbone + DINO head, teacher = its copy without stochastic depth.

    With distillation (`distill_targets`: per frozen model, the widths of its global feature and of its patch
    tokens, and whether its global feature is text-aligned), the student also has the projectors to those widths
    (`MultiCropWrapper.distill_projector`: one `DistillProjector`, or `DistillHeads` with several frozen models or
    their options, `several_teachers`); without the DINO loss
    (`--dino_loss_weight 0`) its head is the identity: nothing to train there, and no warm-up; and the teacher
    is None unless `--distill_ema_student` asks for the EMA of the student.

    Returns also whether the backbone came with trained weights but without a head (a saved
    DinoModel folder, a Hub id, a backbone-only reference file): then the fresh head is trained
    alone for `head_warmup_steps` before the backbone joins, so that a random head does not wreck
    the features. Presets and timm names start from random weights: no warm-up.

    With `--lora_rank`, the backbone gets LoRA factors (`dino_hf.models.lora.add_lora_`) and the teacher
    shares its frozen base weights, held in `base_dtype` when it is given (`lora_base_dtype`).

    With iBOT on (`--ibot_loss_weight`), the backbone has a trained mask token, and with
    `--ibot_separate_head` the student has a second head of the same shape for the patch tokens
    (`MultiCropWrapper.ibot_head`, DINOv3); the teacher copies both.

    Raises:
        ValueError: the crop sizes are not multiples of the backbone's patch size; iBOT on a backbone
            without a mask token (a timm model, a CNN); LoRA on a backbone that is not a ViT.
    """
    backbone, head_state = student_backbone(args)
    mask_token = args.ibot_loss_weight > 0
    pretrained = has_trained_weights(args)
    _check_input_sizes(args, backbone)
    if base_dtype is not None:
        hold_base_in_(backbone, base_dtype)
    if not dino_on(args):
        student = MultiCropWrapper(
            backbone, nn.Identity(), distill_projector=_projector(args, backbone, distill_targets)
        )
        # Without the DINO loss the EMA network is the exported EMA student, or nothing.
        return student, build_teacher(student) if args.distill_ema_student else None, False
    head = _head(args, backbone.num_features)
    if head_state is not None:
        head.load_state_dict(head_state)
    ibot_head = _head(args, backbone.num_features) if mask_token and args.ibot_separate_head else None
    student = MultiCropWrapper(backbone, head, ibot_head, _projector(args, backbone, distill_targets))
    # With LoRA the teacher holds the student's frozen base weights themselves (`lora.shared_parameters`).
    shared = shared_parameters(backbone) if lora_on(args) else None
    return student, build_teacher(student, shared), pretrained and head_state is None


def student_backbone(args: DinoTrainingArguments) -> tuple[nn.Module, dict | None]:
    """The student's backbone as the run starts it, with its LoRA factors under `--lora_rank`, and the weights
    of a reference checkpoint's head (else None). Built again, it is the start of a LoRA run in full precision
    (`lora.with_base_of`)."""
    spec = model_spec(args)
    # A timm model named by --model_name_or_path comes with its trained weights; by --backbone, without.
    from_timm_weights = args.model_name_or_path is not None and spec.startswith(TIMM_PREFIX)
    backbone, head_state = _named_backbone(
        spec,
        flag="--backbone" if args.backbone else "--model_name_or_path",
        drop_path_rate=args.drop_path_rate,
        image_size=args.global_crops_size,
        timm_weights=from_timm_weights,
        mask_token=args.ibot_loss_weight > 0,
        **preset_overrides(args),
    )
    if lora_on(args):
        add_lora_(
            backbone,
            rank=args.lora_rank,
            base=spec,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
            unfreeze_last_blocks=args.unfreeze_last_blocks,
        )
    return backbone, head_state


def lora_base_dtype(args: DinoTrainingArguments, mixed_precision: str) -> torch.dtype | None:
    """The dtype a LoRA run holds its frozen base in (`lora.hold_base_in_`): under bf16 or fp16 mixed precision
    (the Accelerator's `mixed_precision`), that dtype, which autocast computes the Linear layers in,
    when the start has trained weights that can be read again in full precision for the k-NN and the export;
    else None (as loaded: without LoRA, in fp32, or from random weights)."""
    if not lora_on(args) or not has_trained_weights(args):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def build_frozen_backbones(args: DinoTrainingArguments) -> list[nn.Module]:
    """The backbones of the models that `--distill_from` names, in order, with their trained weights (every weight
    checked, timm:NAME with timm's; an image-text model's image side), without stochastic depth, frozen and in
    eval mode.

    Raises:
        ValueError: a name that is not a vision backbone dino_hf reads, or a size it cannot take (exit status 2
            from the script).
    """
    backbones = []
    for spec, size in zip(args.distill_from, teacher_sizes(args), strict=True):
        size = size or args.global_crops_size
        backbone, _ = _named_backbone(
            spec, flag="--distill_from", drop_path_rate=0.0, image_size=size, timm_weights=True, frozen=True
        )
        _check_frozen_input_size(args, spec, backbone, size)
        backbones.append(backbone.eval().requires_grad_(False))
    return backbones


@torch.no_grad()
def frozen_widths(backbone: nn.Module, size: int) -> tuple[int, int]:
    """The widths of a frozen backbone's global feature and of its patch tokens, from one forward of two blank
    `size` px images (an image-text model's global feature may be narrower than its patch tokens)."""
    parameter = next(backbone.parameters())
    features, patch_tokens = backbone.forward_tokens(torch.zeros(2, 3, size, size, dtype=parameter.dtype))
    return int(features.shape[-1]), int(patch_tokens.shape[-1])


def _check_frozen_input_size(args: DinoTrainingArguments, spec: str, backbone: nn.Module, size: int) -> None:
    """The frozen model takes the view at `size` as the student's crops are checked: a ViT a multiple of its
    patch size (else it drops the edge pixels and its patch grid no longer covers the student's view), a
    transformers CNN or Swin a size its strides and windows allow."""
    if args.distill_teacher_size:
        name = "--distill_teacher_size"
    else:
        name = f"the frozen model's input size (--global_crops_size {size}; set --distill_teacher_size)"
    check_input_size = getattr(backbone, "check_input_size", None)
    if check_input_size is not None:
        check_input_size(size, f"{name} ({spec})" if len(args.distill_from) > 1 else name)
        return
    patch = _patch_size(backbone)
    if patch and size % patch:
        below = size - size % patch
        sizes = f"{below} or {below + patch}" if below else str(patch)
        raise ValueError(
            f"{name} {size} is not a multiple of the frozen model's patch size {patch} ({spec}): it "
            "would drop the edge pixels and its patch grid would not cover the student's view; use "
            f"--distill_teacher_size {sizes}"
        )


def _named_backbone(
    spec: str, *, flag: str, timm_weights: bool, mask_token: bool = False, **kwargs
) -> tuple[nn.Module, dict]:
    """The backbone `spec` names and, for a reference DINO checkpoint file, its head's weights (else None).
    `timm_weights`: a `timm:NAME` comes with timm's trained weights. A Hub id or timm weights that cannot be read
    (no connection, offline, no such repository) are a ValueError in one line that names `flag`."""
    if spec.endswith((".pth", ".pt", ".safetensors")) and os.path.isfile(spec):
        imported = dino_from_reference(load_checkpoint_file(spec), drop_path_rate=kwargs["drop_path_rate"])
        return build_backbone(imported.model, mask_token=mask_token), imported.head_state_dict
    pretrained = timm_weights and spec.startswith(TIMM_PREFIX)
    try:
        return build_backbone(spec, pretrained=pretrained, mask_token=mask_token, **kwargs), None
    except OSError as error:  # the Hub's and transformers' errors for a repository that cannot be read
        if os.path.exists(spec) or (spec.startswith(TIMM_PREFIX) and not pretrained):
            raise
        raise ValueError(unreachable_model_message(flag, spec, error)) from None


def _projector(args: DinoTrainingArguments, backbone: nn.Module, targets: list[tuple] | None) -> nn.Module | None:
    """The student's distillation projectors to each frozen model's widths (None without distillation)."""
    if targets is None:
        return None
    heads = [
        DistillProjector(
            backbone.num_features,
            _patch_width(backbone),
            patch_dim,
            args.distill_projector,
            summary_dim=summary_dim,
            text_aligned=text_aligned and several_teachers(args),
        )
        for summary_dim, patch_dim, text_aligned in targets
    ]
    return DistillHeads(heads) if several_teachers(args) else heads[0]


def _patch_width(backbone: nn.Module) -> int:
    """The width of the backbone's patch tokens: a timm CNN's last feature map may be wider than what its
    pre-logits layer pools to (`num_features` of the timm model, not the wrapper's)."""
    if isinstance(backbone, TimmBackbone):
        return int(backbone.model.num_features)
    return int(backbone.num_features)


def _head(args: DinoTrainingArguments, in_dim: int) -> DinoHead:
    return DinoHead(
        in_dim,
        args.out_dim,
        use_bn=args.use_bn_in_head,
        norm_last_layer=args.norm_last_layer,
        nlayers=args.head_nlayers,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
    )


def has_trained_weights(args: DinoTrainingArguments) -> bool:
    """Whether the run's backbone comes with trained weights: `--model_name_or_path` a saved model
    folder, a Hub id, a reference file or trained timm weights (`timm:NAME`); not a DinoModel preset
    (with or without `--config_overrides`), nor a `--backbone`, which start from random weights."""
    return args.model_name_or_path is not None and model_spec(args) not in PRESETS


def _check_input_sizes(args: DinoTrainingArguments, backbone: nn.Module) -> None:
    """The crop sizes against what the built backbone takes: multiples of a ViT's patch size; for the
    transformers CNNs and Swin, sizes their strides and windows allow."""
    if isinstance(backbone, TransformersBackbone):
        backbone.check_input_size(args.global_crops_size, "--global_crops_size")
        if args.local_crops_number:
            backbone.check_input_size(args.local_crops_size, "--local_crops_size")
        return
    check_crop_sizes(args, _patch_size(backbone))


def _patch_size(backbone: nn.Module) -> int | None:
    """The patch size of a ViT backbone (DinoModel or timm), None for a CNN."""
    config = getattr(backbone.model, "config", None)
    if config is not None and hasattr(config, "patch_size"):
        return int(config.patch_size)
    size = getattr(getattr(backbone.model, "patch_embed", None), "patch_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)


__all__ = [
    "build_frozen_backbones",
    "frozen_widths",
    "build_student_teacher",
    "has_trained_weights",
    "lora_base_dtype",
    "student_backbone",
]
