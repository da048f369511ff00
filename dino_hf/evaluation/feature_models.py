"""Any backbone dino_hf can read, as a frozen feature extractor for the evaluations.

`load_feature_model(spec)` reads a `DinoModel` folder or Hub id, a transformers vision backbone folder
(ViT, Dinov2, DINOv3, ConvNeXt, Swin, ...), timm's
pretrained weights or a timm folder, a training checkpoint (its teacher) or a model instance, and
returns it behind one `FeatureModel` interface (the DINO feature, the last blocks' tokens, the last
self-attention), with DINO's evaluation transform (`eval_transform`) normalised with the model's own mean and
std (`model_normalization`).
"""

import abc
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from huggingface_hub import snapshot_download
from PIL import Image
from torch import nn
from torchvision import transforms
from transformers import PreTrainedModel

from ..convert.conversions import dino_from_vit
from ..models.backbones import DinoModelBackbone, TimmBackbone, build_backbone
from ..models.distill_projector import HEADS_DIR, TeacherHeads
from ..models.modeling_dino import DinoModel
from ..models.normalization import (
    IMAGENET,
    Normalization,
    image_processor_config,
    processor_normalization,
    recorded_normalization,
    timm_normalization,
)
from ..models.references import TIMM_PREFIX, is_hub_id, is_timm_folder
from ..models.transformers_backbone import FAMILIES, TransformersBackbone, load_transformers_backbone

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # the trainer's checkpoint folders


class FeatureModel(nn.Module, abc.ABC):
    """A backbone in eval mode. `forward(pixel_values (B, 3, H, W)) -> (B, num_features)` is the DINO feature
    (CLS token after the final LayerNorm for a ViT, pooled feature for a CNN).

    Attributes: `model` (the wrapped network), `num_features`, `has_tokens` (ViTs: `last_blocks` and
    `last_selfattention` work), `patch_size` and `num_prefix_tokens` (CLS and any register tokens);
    `image_size` and `image_size_source` once `load_feature_model` chose the evaluation crop size;
    `normalization` (what its inputs are normalised with: ImageNet's unless `load_feature_model` read the
    model's own) and `normalization_source`.
    """

    has_tokens = True
    normalization, normalization_source = IMAGENET, "ImageNet's, the default"

    def _require_tokens(self, what: str) -> None:
        if not self.has_tokens:
            raise ValueError(f"{what} needs a ViT's tokens; {type(self.model).__name__} only has a pooled feature")

    @abc.abstractmethod
    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        """Outputs of the last `n` blocks after the final LayerNorm: n tensors (B, P + N, D), oldest first."""

    @abc.abstractmethod
    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, P + N, P + N)."""


class DinoFeatureModel(FeatureModel):
    """A `DinoModel` (also what ViT folders and timm DINO folders are converted to)."""

    def __init__(self, model: DinoModel):
        super().__init__()
        self.model = model.eval()
        self.num_features = model.config.hidden_size
        self.patch_size = model.config.patch_size
        self.num_prefix_tokens = 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, return_dict=True).pooler_output  # (B, D)

    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        return self.model.get_intermediate_layers(pixel_values, n)

    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_last_selfattention(pixel_values)


class TimmFeatureModel(FeatureModel):
    """A timm model built with `num_classes=0`. ViTs (`VisionTransformer`) expose their tokens and
    attention; other models (CNNs) only their pooled feature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.num_features = getattr(model, "head_hidden_size", None) or model.num_features
        self.has_tokens = isinstance(model, timm.models.vision_transformer.VisionTransformer)
        self.patch_size = model.patch_embed.patch_size[0] if self.has_tokens else None
        self.num_prefix_tokens = model.num_prefix_tokens if self.has_tokens else 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)  # (B, D)

    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        self._require_tokens("last_blocks")
        outputs = self.model.forward_intermediates(
            pixel_values, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )  # n pairs (patches (B, N, D), prefix (B, P, D))
        return tuple(torch.cat((prefix, patches), dim=1) for patches, prefix in outputs)

    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Read the softmaxed weights as they enter the last block's attention dropout (the fused kernel
        never materialises them, so it is switched off for this call)."""
        self._require_tokens("last_selfattention")
        attention = self.model.blocks[-1].attn
        captured = []
        hook = attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        fused, attention.fused_attn = attention.fused_attn, False
        try:
            self.model.forward_features(pixel_values)
        finally:
            attention.fused_attn = fused
            hook.remove()
        return captured[0]  # (B, heads, P + N, P + N)


class TransformersFeatureModel(FeatureModel):
    """A transformers vision backbone (Dinov2, DINOv3, DeiT, ConvNeXt, Swin; `TransformersBackbone`). The
    ViT families expose their tokens and attention; ConvNeXt and Swin only their pooled feature."""

    def __init__(self, backbone: TransformersBackbone):
        super().__init__()
        self.backbone = backbone.eval()
        self.model = backbone.model
        self.num_features = backbone.num_features
        self.has_tokens = backbone.family.fixed_patch_grid
        self.patch_size = backbone.patch_size
        self.num_prefix_tokens = backbone.num_prefix_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values)  # (B, D)

    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        self._require_tokens("last_blocks")
        hidden_states = self.backbone.model_outputs(pixel_values, output_hidden_states=True).hidden_states
        norm = getattr(self.model, "layernorm", None) or self.model.norm  # the final norm (DINOv3: `norm`)
        return tuple(norm(hidden) for hidden in hidden_states[-n:])  # n x (B, P + N, D)

    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last block's attention weights, computed by the eager attention for this call (the fused
        kernels never materialise them)."""
        self._require_tokens("last_selfattention")
        implementation = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            return self.backbone.model_outputs(pixel_values, output_attentions=True).attentions[-1]
        finally:
            self.model.set_attn_implementation(implementation)


class TeacherFeatureModel(FeatureModel):
    """A student distilled from several frozen models, standing in for one of them: the student's backbone with
    its heads for that model (`OUTPUT_DIR/student_heads/<teacher>/`, `TeacherHeads`). `forward` gives the
    frozen model's global feature as the student predicts it, `forward_tokens` also its patch features, in the
    frozen model's own space (the heads' output mapped back through the inverse of its balancing)."""

    has_tokens = False

    def __init__(self, backbone: nn.Module, heads: TeacherHeads):
        super().__init__()
        self.backbone, self.heads = backbone.eval(), heads.eval()
        self.model = backbone.model
        self.teacher = heads.config["name"]
        self.num_features = heads.config["summary_dim"]
        self.patch_size, self.num_prefix_tokens = None, 0

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values (B, 3, H, W)` -> the teacher's global feature `(B, D_t)` and patch features `(B, P, C_t)`
        on the student's patch grid."""
        return self.heads(*self.backbone.forward_tokens(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(pixel_values)[0]  # (B, D_t)

    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        self._require_tokens("last_blocks")

    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._require_tokens("last_selfattention")


def load_feature_model(
    spec: "str | os.PathLike | nn.Module", image_size: int | None = None, teacher: str | None = None
) -> tuple[FeatureModel, Callable[[Image.Image], torch.Tensor]]:
    """The backbone named by `spec` in eval mode (frozen when read from disk), with DINO's evaluation
    transform normalised with the model's own mean and std (`model_normalization`). A model instance is
    used as it is: its parameters are left trainable or not.

    Args:
        spec: a folder written by `DinoModel.save_pretrained` or its Hub id; a transformers ViT folder
            or Hub id (converted to `DinoModel` keeping its config's LayerNorm eps, so that its features
            are stock transformers' `ViTModel`'s: `convert.dino_from_vit(keep_layer_norm_eps=True)`);
            `"timm:NAME"` (timm's pretrained weights) or a timm folder (`config.json` with
            `architecture`); a training checkpoint `checkpoint-<step>/` (its `teacher_backbone/`, or
            `student_backbone/` for a distillation run) or a training output folder (its latest checkpoint); or
            a model instance (`DinoModel`, timm
            model, or a backbone of `build_backbone`).
        image_size: crop size of the transform; by default the model's own (`native_image_size`).
        teacher: for a student distilled from several frozen models, the name of one of them (a folder of
            `student_heads/` beside its export): the student then stands in for that model
            (`TeacherFeatureModel`: its features in that model's space).

    Returns:
        `(FeatureModel, transform)` where `transform(PIL image) -> (3, S, S)` is `eval_transform`. The
        feature model's `image_size` is S and its `normalization` the mean and std; their `*_source`
        attributes say where each came from.
    """
    folder = None
    if isinstance(spec, nn.Module):
        model = spec.model if isinstance(spec, (DinoModelBackbone, TimmBackbone)) else spec
        normalization = model_normalization(spec)
    elif str(spec).startswith(TIMM_PREFIX):
        backbone = build_backbone(str(spec), pretrained=True, drop_path_rate=0.0)
        model, normalization = backbone.model.requires_grad_(False), model_normalization(backbone)
    else:
        folder = _model_folder(spec)
        config = json.loads((folder / "config.json").read_text())
        if is_timm_folder(folder):
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
        elif config.get("model_type") == "dino_vit":
            model = DinoModel.from_pretrained(folder, drop_path_rate=0.0)
        elif config.get("model_type") == "vit":
            model = dino_from_vit(folder, keep_layer_norm_eps=True)  # stock ViTModel's features
        elif config.get("model_type") in FAMILIES:
            model = load_transformers_backbone(str(folder))
        else:
            raise ValueError(
                f"{folder}/config.json has model_type {config.get('model_type')!r}; load_feature_model reads "
                f"DinoModel ('dino_vit'), transformers vision backbones ({', '.join(sorted(FAMILIES))}) and timm "
                "folders ('architecture')"
            )
        model.requires_grad_(False)  # read from disk: nothing of it is trained here
        normalization = model_normalization(model, folder)
    if teacher is not None:
        return _teacher_feature_model(spec, folder, teacher, image_size, normalization)
    if isinstance(model, PreTrainedModel) and model.config.model_type in FAMILIES:
        model = TransformersBackbone(model, FAMILIES[model.config.model_type])
    if isinstance(model, TransformersBackbone):
        feature_model = TransformersFeatureModel(model)
    elif isinstance(model, DinoModel):
        feature_model = DinoFeatureModel(model)
    else:
        feature_model = TimmFeatureModel(model)
    if image_size is None:
        image_size, source = native_image_size(model, folder)
    else:
        source = "given"
    feature_model.image_size, feature_model.image_size_source = image_size, source
    feature_model.normalization, feature_model.normalization_source = normalization
    return feature_model, eval_transform(image_size, feature_model.normalization)


def _teacher_feature_model(spec, folder: Path | None, teacher: str, image_size: int | None, normalization):
    """`load_feature_model(..., teacher=NAME)`: the student's backbone and its heads for NAME."""
    heads_root = folder.parent / HEADS_DIR if folder is not None else None
    if heads_root is None or not (heads_root / teacher / TeacherHeads.CONFIG).is_file():
        found = (
            sorted(path.name for path in heads_root.iterdir())
            if heads_root is not None and heads_root.is_dir()
            else []
        )
        raise ValueError(
            f"{spec} has no heads for the frozen model {teacher!r} (a {HEADS_DIR}/{teacher}/ folder beside the "
            f"student's export); "
            + (
                f"it has heads for {', '.join(found)}"
                if found
                else "only a run distilled from several frozen models has them"
            )
        )
    backbone = build_backbone(str(folder), drop_path_rate=0.0).requires_grad_(False)
    feature_model = TeacherFeatureModel(backbone, TeacherHeads.from_folder(heads_root / teacher))
    if image_size is None:
        image_size, source = native_image_size(backbone.model, folder)
    else:
        source = "given"
    feature_model.image_size, feature_model.image_size_source = image_size, source
    feature_model.normalization, feature_model.normalization_source = normalization
    return feature_model, eval_transform(image_size, feature_model.normalization)


def model_normalization(model: nn.Module, folder: Path | None = None) -> tuple[Normalization, str]:
    """The mean and std a model's inputs are normalised with, and where they were read.

    A model read from a folder: for a timm folder its `pretrained_cfg` (what timm and transformers'
    `TimmWrapperModel` read), for the others its image processor (`preprocessor_config.json`: a
    transformers checkpoint's own, an export's, which carries its training normalisation). A model
    instance: what `build_backbone` recorded on it (`dino_hf.models.normalization.recorded_normalization`). In
    every case ImageNet's when the model names none.
    """
    default = IMAGENET, "ImageNet's: the model names no mean and std"
    if folder is None:  # an instance, or timm:NAME as build_backbone built it
        recorded = recorded_normalization(model)
        return (recorded, "those of the weights it was built from") if recorded is not None else default
    if is_timm_folder(folder):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return (timm_normalization(model), "timm's pretrained_cfg") if "mean" in cfg and "std" in cfg else default
    processor = image_processor_config(folder)
    if processor:
        return processor_normalization(processor, str(folder)), "its image processor"
    return default


def native_image_size(model: nn.Module, folder: Path | None = None) -> tuple[int, str]:
    """The crop size a model is evaluated at by default, and where it was read.

    In this order: the crop size of the image processor saved with the model
    (`preprocessor_config.json`), the training resolution of the checkpoint the folder belongs to
    (`training_args.json`), timm's `pretrained_cfg` input size, a `DinoModel` instance's configured
    image size; 224 when the model says nothing.
    """
    if folder is not None:
        processor_file = folder / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            crop = processor.get("crop_size") if processor.get("do_center_crop", True) else None
            crop = crop or processor.get("size")
            # ConvNeXt's processors output shortest_edge x shortest_edge (with their crop_pct), without crop_size.
            crop = (crop.get("height") or crop.get("shortest_edge")) if isinstance(crop, dict) else crop
            if crop:
                return int(crop), "the crop size of its image processor"
        training_args = folder.parent / "training_args.json"
        if training_args.is_file():
            size = json.loads(training_args.read_text()).get("global_crops_size")
            if size:
                return int(size), "the training resolution of its checkpoint"
    if isinstance(model, DinoModel):
        return model.config.image_size, "its config"
    input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if input_size:
        return int(input_size[-1]), "timm's pretrained_cfg"
    return 224, "the default: the model names no size"


# The export a training folder or checkpoint holds: a DINO run's teacher, a distillation run's student.
_EXPORTS = ("teacher_backbone", "student_backbone")


def _model_folder(spec: "str | os.PathLike") -> Path:
    """Local folder holding the model's config.json: a checkpoint's export (its teacher, or its student
    for a distillation run), a run's latest checkpoint's, or a Hub snapshot."""
    folder = Path(spec)
    if not folder.is_dir():
        if not is_hub_id(str(spec)):
            raise ValueError(f"{spec} is neither a folder nor a Hub id 'org/name'; check the path")
        return Path(snapshot_download(str(spec)))
    if (export := _export_in(folder)) is not None:
        return export
    if not (folder / "config.json").is_file():
        steps = {int(match[1]): path for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))}
        checkpoints = [steps[step] for step in sorted(steps)]
        if checkpoints and (export := _export_in(checkpoints[-1])) is not None:
            return export
        raise ValueError(
            f"{folder} has no config.json, no teacher_backbone/ or student_backbone/ and no checkpoint-<step>/ "
            "holding one; pass a model folder, a training checkpoint folder or a training output folder"
        )
    return folder


def _export_in(folder: Path) -> Path | None:
    """The export inside a training output or checkpoint folder, if it holds one."""
    return next((folder / name for name in _EXPORTS if (folder / name).is_dir()), None)


def eval_transform(image_size: int = 224, normalization: Normalization = IMAGENET) -> transforms.Compose:
    """DINO's evaluation transform: resize the short side to 256 (bicubic), centre-crop 224, normalise with
    `normalization` (the evaluated model's own; ImageNet's by default); other sizes keep the 256 / 224
    ratio. PIL image -> (3, S, S)."""
    return transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(normalization.mean, normalization.std),
        ]
    )


__all__ = [
    "DinoFeatureModel",
    "FeatureModel",
    "TimmFeatureModel",
    "TransformersFeatureModel",
    "eval_transform",
    "load_feature_model",
    "model_normalization",
    "native_image_size",
]
