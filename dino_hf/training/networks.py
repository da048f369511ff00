"""The student and teacher networks of a run, built from its training arguments."""

import os

from torch import nn

from ..convert.conversions import dino_from_reference
from ..convert.weight_files import load_checkpoint_file
from ..models.backbones import build_backbone
from ..models.configuration_dino import PRESETS
from ..models.heads import DinoHead
from ..models.multicrop_wrapper import MultiCropWrapper
from ..models.references import TIMM_PREFIX
from ..models.transformers_backbone import TransformersBackbone
from .arguments import DinoTrainingArguments, check_crop_sizes, model_spec, preset_overrides
from .teacher import build_teacher


def build_student_teacher(args: DinoTrainingArguments) -> tuple[MultiCropWrapper, MultiCropWrapper, bool]:
    """Student = backbone + DINO head, teacher = its copy without stochastic depth.

    Returns also whether the backbone came with trained weights but without a head (a saved
    DinoModel folder, a Hub id, a backbone-only reference file): then the fresh head is trained
    alone for `head_warmup_steps` before the backbone joins, so that a random head does not wreck
    the features. Presets and timm names start from random weights: no warm-up.

    With iBOT on (`--ibot_loss_weight`), the backbone has a trained mask token, and with
    `--ibot_separate_head` the student has a second head of the same shape for the patch tokens
    (`MultiCropWrapper.ibot_head`, DINOv3); the teacher copies both.

    Raises:
        ValueError: the crop sizes are not multiples of the backbone's patch size; iBOT on a backbone
            without a mask token (a timm model, a CNN).
    """
    spec = model_spec(args)
    head_state = None
    mask_token = args.ibot_loss_weight > 0
    if spec.endswith((".pth", ".pt", ".safetensors")) and os.path.isfile(spec):
        imported = dino_from_reference(load_checkpoint_file(spec), drop_path_rate=args.drop_path_rate)
        backbone = build_backbone(imported.model, mask_token=mask_token)
        head_state = imported.head_state_dict
    else:
        # A timm model named by --model_name_or_path comes with its trained weights; by --backbone, without.
        from_timm_weights = args.model_name_or_path is not None and spec.startswith(TIMM_PREFIX)
        backbone = build_backbone(
            spec,
            drop_path_rate=args.drop_path_rate,
            image_size=args.global_crops_size,
            pretrained=from_timm_weights,
            mask_token=mask_token,
            **preset_overrides(args),
        )
    pretrained = has_trained_weights(args)
    _check_input_sizes(args, backbone)
    head = _head(args, backbone.num_features)
    if head_state is not None:
        head.load_state_dict(head_state)
    ibot_head = _head(args, backbone.num_features) if mask_token and args.ibot_separate_head else None
    student = MultiCropWrapper(backbone, head, ibot_head)
    return student, build_teacher(student), pretrained and head_state is None


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


__all__ = ["build_student_teacher", "has_trained_weights"]
