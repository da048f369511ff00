"""A distilled student with its summary head, and the text tower of its CLIP teacher, as one stock
transformers zero-shot image classifier (docs/evaluation.md#zero-shot-classification).

A student distilled from a CLIP-like teacher learns, through a summary head, the teacher's text-aligned
image embedding. `export_zero_shot` writes that student, its head and the teacher's text side as
transformers' `VisionTextDualEncoderModel`:

    vision_model       the student, as a stock transformers model whose `pooler_output` is the feature
                       the summary head was trained on (`vision_tower`)
    visual_projection  the summary head (a bias-free Linear, student width -> embedding width)
    text_model         the teacher's text tower (CLIPTextModel) and its weights
    text_projection    the teacher's text projection
    logit_scale        log of the factor the cosine similarities are multiplied by (the teacher's)

with the teacher's tokenizer and a stock image processor at the student's size, mean and std. The folder
loads with `pipeline("zero-shot-image-classification", model=FOLDER)` and `AutoModel` without dino_hf,
and its logits are `exp(logit_scale) * cos(head(student feature), teacher text embedding)`.

Only CLIP teachers export (`load_text_teacher`). The dual encoder rebuilds its text tower with
`AutoModel.from_config` on loading, and AutoModel has no model for the text towers of SigLIP, SigLIP 2
and MetaCLIP 2 (transformers 5.25); SigLIP also scores with a sigmoid and `logit_bias` and reads text
padded to 64 tokens, none of which the dual encoder or the pipeline give it.
"""

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    TimmWrapperModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ..models.backbones import DinoModelBackbone, TimmBackbone
from ..models.modeling_dino import DinoModel
from ..models.normalization import IMAGENET, Normalization, set_normalization_
from ..models.transformers_backbone import FAMILIES, TransformersBackbone
from .export import (
    _replace_folder,
    dino_to_dinov2_with_registers,
    export_backbone,
    is_timm_model,
    source_image_processor,
)

# Teachers whose image-text embeddings are CLIP's: the text tower's pooled output through a bias-free
# `text_projection`, scored by `exp(logit_scale) * cosine`. Their text tower must also be a model that
# transformers' AutoModel builds from its config, as VisionTextDualEncoderModel rebuilds it on loading.
CLIP_LAYOUT = ("clip", "metaclip_2")

# Where a distillation run exports the zero-shot classifier, beside the student's export (`--distill_zero_shot`).
ZERO_SHOT_DIR = "student_zero_shot"

# What the export is checked on once written: two images of noise and two prompts.
_PROBE_TEXTS = ("a photo of a dog.", "a diagram.")


def export_zero_shot(
    vision_model: nn.Module,
    projection: nn.Linear | torch.Tensor,
    teacher_folder: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    logit_scale: float | None = None,
) -> Path:
    """Write the student `vision_model` with its summary head `projection` and the text side of the
    CLIP-like teacher in `teacher_folder` as a `VisionTextDualEncoderModel` folder at `output_dir`
    (replaced whole; written under a temporary name first).

    Args:
        vision_model: the student: a transformers ViT, DeiT, DINOv2 (with registers), DINOv3, ConvNeXt or
            Swin model, a timm model (`num_classes=0`), a `DinoModel`, or the `build_backbone` wrapper of
            one. Its feature is its family's (`vision_tower`); it is copied, never changed.
        projection: the summary head, `Linear(student width -> teacher embedding width)` without a bias
            (or with an all-zero one), or its weight `(embedding width, student width)`.
        teacher_folder: the teacher's folder or Hub id (a CLIPModel, with its tokenizer).
        image_size, image_mean, image_std: the student's input size and normalisation. The image
            processor is the teacher's (resize and crop as the teacher's protocol) set to these; DINO's
            evaluation transform with them when the teacher's processor cannot give `image_size` squares.
        logit_scale: the factor cosine similarities are multiplied by; the teacher's
            (`exp(teacher.logit_scale)`, 100 for OpenAI's CLIP) when None.

    The folder is loaded back once written and its image embeddings, text embeddings and scale are
    compared with the student's head output, the teacher's text embeddings and `logit_scale` on a probe.

    Raises:
        ValueError: a head with a bias or of another kind than Linear, widths that do not meet, a teacher
            other than CLIP, a student that the stock models cannot hold at `image_size`.
    """
    weight = projection_weight(projection)
    normalization = Normalization(tuple(image_mean), tuple(image_std))
    backbone = student_backbone(vision_model)
    tower = vision_tower(backbone, image_size, normalization)
    teacher = load_text_teacher(teacher_folder)
    text_projection = teacher.text_projection.weight.detach().float().clone()  # (P, text width)
    if weight.shape[1] != tower.config.hidden_size:
        raise ValueError(
            f"the summary head reads {weight.shape[1]} features but the student's feature has "
            f"{tower.config.hidden_size}: pass the head that was trained on this student's pooled feature"
        )
    if weight.shape[0] != text_projection.shape[0]:
        raise ValueError(
            f"the summary head gives {weight.shape[0]}-d embeddings but the teacher {teacher_folder}'s text "
            f"embeddings have {text_projection.shape[0]}: pass the head trained to this teacher's image embedding"
        )
    scale = float(teacher.logit_scale.exp().item()) if logit_scale is None else float(logit_scale)
    model = _dual_encoder(tower, teacher.text_model, weight, text_projection, scale)
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder)
    image_processor = source_image_processor(str(teacher_folder), image_size, normalization)
    output_dir = Path(output_dir).resolve()
    staging = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
        reference = copy.deepcopy(backbone).cpu().float().eval()
        _check_export(staging, reference, weight, teacher, tokenizer, image_size, scale)
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def projection_weight(projection: nn.Module | torch.Tensor) -> torch.Tensor:
    """The summary head as the `(embedding width, student width)` weight of a bias-free Linear.

    `VisionTextDualEncoderModel.visual_projection` is one bias-free Linear: a bias (the cosine with the
    text embedding is not blind to it) or an MLP head has no exact place in it, and is refused."""
    if isinstance(projection, torch.Tensor):
        weight = projection
    elif isinstance(projection, nn.Linear):
        if projection.bias is not None and bool(projection.bias.detach().ne(0).any()):
            raise ValueError(
                "the summary head has a bias, which VisionTextDualEncoderModel's bias-free visual_projection "
                "cannot hold; train the summary head as nn.Linear(..., bias=False)"
            )
        weight = projection.weight
    else:
        raise ValueError(
            f"the summary head is a {type(projection).__name__}; VisionTextDualEncoderModel holds one bias-free "
            "Linear (its visual_projection): train the summary head as nn.Linear(..., bias=False)"
        )
    if weight.ndim != 2:
        raise ValueError(f"the summary head's weight has shape {tuple(weight.shape)}; expected (embedding, feature)")
    return weight.detach().float().cpu().clone()


def student_backbone(vision_model: nn.Module) -> nn.Module:
    """`vision_model` behind the interface the training reads its feature through (`build_backbone`'s
    wrappers): a module mapping `(B, 3, H, W)` to the feature `(B, D)` the summary head is trained on."""
    if isinstance(vision_model, (TimmBackbone, DinoModelBackbone, TransformersBackbone)):
        return vision_model
    if isinstance(vision_model, DinoModel):
        return DinoModelBackbone(vision_model)
    if is_timm_model(vision_model):
        return TimmBackbone(vision_model)
    model_type = getattr(getattr(vision_model, "config", None), "model_type", None)
    if isinstance(vision_model, PreTrainedModel) and model_type in FAMILIES:
        return TransformersBackbone(vision_model, FAMILIES[model_type])
    raise ValueError(
        f"cannot export a {type(vision_model).__name__} student: expected a timm model, a DinoModel or a "
        f"transformers model of type {', '.join(sorted(FAMILIES))} (or the wrappers build_backbone returns)"
    )


def vision_tower(backbone: nn.Module, image_size: int, normalization: Normalization = IMAGENET) -> PreTrainedModel:
    """A stock transformers copy of the student in `backbone` whose `pooler_output` at `image_size` is the
    feature `backbone` gives, which `VisionTextDualEncoderModel` feeds its visual_projection; its config's
    `hidden_size` is that feature's width.

    - ViT, DeiT (feature: the CLS token after the final LayerNorm): the pooler, an untrained dense + tanh
      or absent, becomes an identity dense with a linear activation. These models take their own
      `image_size` only, since the dual encoder does not pass `interpolate_pos_encoding`.
    - DINOv2, DINOv3, ConvNeXt, Swin: `pooler_output` is already the feature.
    - a DinoModel: transformers' `Dinov2WithRegistersModel` (`pooler_output`: the CLS token after the
      final LayerNorm), exact at the DinoModel's own image size.
    - a timm model: transformers' `TimmWrapperModel` (`pooler_output`: timm's pooled features, what a
      timm model built with `num_classes=0` returns), with `hidden_size` added to its config and
      `normalization` in its `pretrained_cfg`.
    """
    model = copy.deepcopy(backbone.model).cpu().float().eval()
    if isinstance(backbone, TimmBackbone):
        tower = _timm_tower(set_normalization_(model, normalization), image_size)
    elif isinstance(backbone, DinoModelBackbone):
        if image_size != model.config.image_size:
            raise ValueError(
                f"a DinoModel student exports as Dinov2WithRegistersModel, which interpolates position "
                f"embeddings differently at other sizes than its own {model.config.image_size} px; export at "
                f"image_size={model.config.image_size}"
            )
        tower = dino_to_dinov2_with_registers(model)
    elif backbone.family.feature == "cls":
        tower = _cls_pooler_tower(model, image_size)
    else:
        tower = model
    width = backbone.num_features
    if getattr(tower.config, "hidden_size", None) is None:  # ConvNeXt's config names hidden_sizes only
        tower.config.hidden_size = width
    elif tower.config.hidden_size != width:
        raise ValueError(
            f"the {tower.config.model_type} student's config has hidden_size {tower.config.hidden_size} but its "
            f"pooled feature has {width}; VisionTextDualEncoderModel sizes its visual_projection by hidden_size"
        )
    return tower.eval()


def _cls_pooler_tower(model: PreTrainedModel, image_size: int) -> PreTrainedModel:
    """A ViT / DeiT whose `pooler_output` is the CLS token after the final LayerNorm (as `save_as_vit`)."""
    if image_size != model.config.image_size:
        raise ValueError(
            f"a {model.config.model_type} student takes {model.config.image_size} px images in "
            f"VisionTextDualEncoderModel, which does not pass interpolate_pos_encoding; export at "
            f"image_size={model.config.image_size}"
        )
    config = copy.deepcopy(model.config)
    config.pooler_act, config.pooler_output_size = "linear", config.hidden_size
    tower = type(model)(config, add_pooling_layer=True, use_mask_token=False)
    state = {key: tensor for key, tensor in model.state_dict().items() if not key.startswith("pooler.")}
    state["pooler.dense.weight"] = torch.eye(config.hidden_size)  # (D, D): the CLS token passes through
    state["pooler.dense.bias"] = torch.zeros(config.hidden_size)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    if missing or set(unexpected) - {"embeddings.mask_token"}:  # the mask token only serves masked training
        raise RuntimeError(f"the {type(model).__name__} copy misses {missing} and does not take {unexpected}")
    return tower


def _timm_tower(model: nn.Module, image_size: int) -> TimmWrapperModel:
    """The timm model as transformers' `TimmWrapperModel`, through the timm folder `export_backbone` writes."""
    with tempfile.TemporaryDirectory() as folder:
        export_backbone(model, Path(folder) / "timm", image_size=image_size)
        tower = TimmWrapperModel.from_pretrained(Path(folder) / "timm", dtype=torch.float32)
    tower.config._name_or_path = ""  # the temporary folder
    return tower


def load_text_teacher(teacher_folder: str | os.PathLike) -> PreTrainedModel:
    """The CLIP teacher in `teacher_folder` (float32, eval mode); a teacher whose text side a stock
    `VisionTextDualEncoderModel` cannot hold is refused, with the reason (`text_side_refusal`)."""
    refusal = text_side_refusal(teacher_folder)
    if refusal is not None:
        raise ValueError(refusal)
    return AutoModel.from_pretrained(teacher_folder, dtype=torch.float32).eval()


def text_side_refusal(teacher_folder: str | os.PathLike) -> str | None:
    """Why the text side of the teacher in `teacher_folder` cannot go into the zero-shot export, read from its
    config alone; None when it can."""
    try:
        config = AutoConfig.from_pretrained(teacher_folder)
    except (OSError, ValueError) as error:
        return (
            f"the teacher {teacher_folder} does not load as a transformers model folder with its text tower "
            f"(a timm image tower has none): {str(error).splitlines()[0]}"
        )
    text_config = getattr(config, "text_config", None)
    if config.model_type not in CLIP_LAYOUT:
        siglip = "siglip" in config.model_type
        return (
            f"the teacher {teacher_folder} is a {config.model_type} model; the zero-shot export takes CLIP's text "
            "tower, text_projection and exp(logit_scale) * cosine"
            + (
                ": a SigLIP text tower has no AutoModel entry for VisionTextDualEncoderModel to rebuild it from, "
                "and its sigmoid scores with logit_bias no place in it"
                if siglip
                else ""
            )
        )
    if type(text_config) not in MODEL_MAPPING:
        return (
            f"the teacher {teacher_folder}'s text tower ({type(text_config).__name__}) has no AutoModel entry in "
            f"this transformers, and VisionTextDualEncoderModel rebuilds its text tower through AutoModel on "
            "loading: only a CLIP teacher exports"
        )
    return None


def _dual_encoder(
    tower: PreTrainedModel,
    text_model: PreTrainedModel,
    weight: torch.Tensor,
    text_projection: torch.Tensor,
    scale: float,
) -> VisionTextDualEncoderModel:
    text_model = copy.deepcopy(text_model)  # the teacher's own stays as it is, the reference of the check
    tower_state, text_state = copy.deepcopy(tower.state_dict()), copy.deepcopy(text_model.state_dict())
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        tower.config, text_model.config, projection_dim=weight.shape[0], logit_scale_init_value=math.log(scale)
    )
    model = VisionTextDualEncoderModel(config, vision_model=tower, text_model=text_model)
    # The constructor may initialise the towers it is given: their weights go in afterwards.
    model.vision_model.load_state_dict(tower_state)
    model.text_model.load_state_dict(text_state)
    with torch.no_grad():
        model.visual_projection.weight.copy_(weight)
        model.text_projection.weight.copy_(text_projection)
        model.logit_scale.fill_(math.log(scale))
    return model.float().eval()


@torch.no_grad()
def _check_export(
    folder: Path, reference: nn.Module, weight: torch.Tensor, teacher, tokenizer, image_size: int, scale: float
) -> None:
    """Load `folder` back and compare it with the student's head output, the teacher's text embeddings and
    `scale` on a probe; a difference is a fault of the export."""
    export = VisionTextDualEncoderModel.from_pretrained(folder, dtype=torch.float32).eval()
    pixel_values = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        expected_images = reference(pixel_values) @ weight.T  # (2, P)
    except RuntimeError as error:
        raise ValueError(f"the student cannot take {image_size} px images: {str(error).splitlines()[0]}") from None
    text = tokenizer(list(_PROBE_TEXTS), padding=True, return_tensors="pt")
    pairs = {
        "image embeddings": (export.get_image_features(pixel_values=pixel_values).pooler_output, expected_images),
        "text embeddings": (
            export.get_text_features(**text).pooler_output,
            teacher.get_text_features(**text).pooler_output,
        ),
        "logit scale": (export.logit_scale.exp(), torch.tensor(scale)),
    }
    for what, (got, expected) in pairs.items():
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            difference = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
            raise RuntimeError(f"the exported folder's {what} differ from the student's and teacher's: {difference}")


__all__ = [
    "CLIP_LAYOUT",
    "ZERO_SHOT_DIR",
    "export_zero_shot",
    "load_text_teacher",
    "text_side_refusal",
    "projection_weight",
    "student_backbone",
    "vision_tower",
]
