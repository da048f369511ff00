"""Student and teacher networks of DINO: multi-crop forward, teacher construction and its EMA.

Both networks are backbone + head behind a `MultiCropWrapper`, as the reference, so their state dict
keys are `backbone.*` and `head.*`. The teacher is built from the student and never receives
gradients: it follows the student by an exponential moving average of the parameters
(paper Sec. 3.1 "Teacher network"), theta_t = m * theta_t + (1 - m) * theta_s.
"""

import copy
import itertools
import os

import torch
from torch import nn

from .backbones import build_backbone
from .model_references import TIMM_PREFIX
from .configuration_dino import PRESETS
from .convert import dino_from_reference
from .heads import DinoHead
from .sharding import local_tensors
from .training_args import DinoTrainingArguments, check_crop_sizes
from .weight_files import load_checkpoint_file


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different resolutions.

    Consecutive crops of the same resolution (the same last dimension, as the reference) are
    concatenated and passed through the backbone in one call; the head then runs once on the
    features of all crops.

    Args:
        backbone (`nn.Module`): maps `(B, 3, H, W)` to features `(B, D)` (see `build_backbone`).
        head (`nn.Module`): maps `(B, D)` to `(B, K)` (a `DinoHead`).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The backbone's blocks (a DinoModel's embeddings and layers): the units that FSDP shards
        (Accelerate's transformer-based wrap policy reads this name)."""
        names = getattr(getattr(self.backbone, "model", None), "_no_split_modules", None)
        return sorted(names) if names is not None else None

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """`crops`: list of `(B, 3, H_i, W_i)` -> `(len(crops) * B, K)`, rows in crop order
        [crop 1 batch, crop 2 batch, ...] (for DINO: global 1, global 2, local 1, ...)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        # Grouped on the host from the shapes alone: no tensor is read back from the device.
        features = [
            self.backbone(torch.cat(list(group)))  # (count * B, D)
            for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1])
        ]
        return self.head(torch.cat(features))  # (len(crops) * B, K)


def build_teacher(student: MultiCropWrapper) -> MultiCropWrapper:
    """The teacher: a copy of the student with gradients off.

    As in the reference, the teacher's head has `norm_last_layer=True` semantics (its
    `last_layer.weight_g` is not trained; it only follows the student's through the EMA), and its
    backbone has no stochastic depth (the reference builds the teacher without `drop_path_rate`).
    The teacher stays in the student's train/eval mode: with BatchNorm, it normalises with the
    statistics of its own batch, as the reference's.
    """
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if isinstance(getattr(module, "drop_prob", None), float):
            module.drop_prob = 0.0
    if hasattr(teacher.head, "norm_last_layer"):
        teacher.head.norm_last_layer = True
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s for every parameter, in place.

    Parameters are paired in `parameters()` order (trainable and frozen alike, as the reference);
    buffers (BatchNorm statistics, the loss center) are not averaged. Uses fused multi-tensor ops.
    Under FSDP (`sharding.shard_like`) each process averages its own shards.

    Args:
        teacher (`nn.Module`): updated in place.
        student (`nn.Module`): the same architecture, unwrapped (not the DDP wrapper).
        momentum (`float`): m of this step (`teacher_momentum_at`), in [0, 1]; 1 leaves the teacher
            unchanged.
    """
    teacher_params = local_tensors(list(teacher.parameters()))
    student_params = local_tensors([p.detach() for p in student.parameters()])
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameters and student {len(student_params)}; build the "
            "teacher with build_teacher(student) and pass the unwrapped student (accelerator.unwrap_model)"
        )
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def build_student_teacher(args: DinoTrainingArguments) -> tuple[MultiCropWrapper, MultiCropWrapper, bool]:
    """Student = backbone + DINO head, teacher = its copy without stochastic depth.

    Returns also whether the backbone came with trained weights but without a head (a saved
    DinoModel folder, a Hub id, a backbone-only reference file): then the fresh head is trained
    alone for `head_warmup_steps` before the backbone joins, so that a random head does not wreck
    the features. Presets and timm names start from random weights: no warm-up.

    Raises:
        ValueError: the crop sizes are not multiples of the backbone's patch size.
    """
    spec = args.backbone or args.model_name_or_path or "vit_small_patch16"
    head_state = None
    if spec.endswith((".pth", ".pt", ".safetensors")) and os.path.isfile(spec):
        imported = dino_from_reference(load_checkpoint_file(spec), drop_path_rate=args.drop_path_rate)
        backbone = build_backbone(imported.model)
        head_state = imported.head_state_dict
    else:
        # A timm model named by --model_name_or_path comes with its trained weights; by --backbone, without.
        from_timm_weights = args.model_name_or_path is not None and spec.startswith(TIMM_PREFIX)
        backbone = build_backbone(spec, drop_path_rate=args.drop_path_rate, image_size=args.global_crops_size,
                                  pretrained=from_timm_weights)
    pretrained = args.model_name_or_path is not None and spec not in PRESETS
    check_crop_sizes(args, _patch_size(backbone))
    head = DinoHead(
        backbone.num_features,
        args.out_dim,
        use_bn=args.use_bn_in_head,
        norm_last_layer=args.norm_last_layer,
        nlayers=args.head_nlayers,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
    )
    if head_state is not None:
        head.load_state_dict(head_state)
    student = MultiCropWrapper(backbone, head)
    return student, build_teacher(student), pretrained and head_state is None


def _patch_size(backbone: nn.Module) -> int | None:
    """The patch size of a ViT backbone (DinoModel or timm), None for a CNN."""
    config = getattr(backbone.model, "config", None)
    if config is not None and hasattr(config, "patch_size"):
        return int(config.patch_size)
    size = getattr(getattr(backbone.model, "patch_embed", None), "patch_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (tuple, list)) else size)



__all__ = ["MultiCropWrapper", "build_student_teacher", "build_teacher", "ema_update_"]
