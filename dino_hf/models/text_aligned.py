"""Frozen teachers: the image towers of image-text models, and RADIO.

Feature distillation (`--distill_from`) reads these families as frozen models, never as backbones to train.
A folder with both towers (CLIP, MetaCLIP 2, SigLIP, SigLIP 2, AIMv2) is given whole and only its image side
is loaded: every vision tensor is checked against the checkpoint (`dino_hf.models.weight_check`), and the
text side (`TeacherFamily.text_prefixes`) is the one part of it left out. The teacher's `text_aligned` says
whether its global feature is the embedding the text tower is aligned with, and `source` is the folder that
holds that tower.

Global feature and patch tokens, as the stock transformers models give them:

- CLIP, MetaCLIP 2 (`clip`, `metaclip_2`): `visual_projection(post_layernorm(CLS))`, the `pooler_output` of
  `CLIPModel.get_image_features`, text-aligned. A vision folder alone (`clip_vision_model`) has it where it was
  saved with its projection (`CLIPVisionModelWithProjection`), else its `pooler_output`, `post_layernorm(CLS)`,
  not text-aligned. Patch tokens: `last_hidden_state[:, 1:]`, before `post_layernorm`, which transformers' CLIP
  (as OpenAI's) applies to the CLS token alone; open_clip, timm and AM-RADIO's CLIP teacher norm every token,
  which `timm:vit_*_clip_*` gives.
- SigLIP, SigLIP 2 (`siglip`, `siglip2` and their `*_vision_model`): no CLS token. The attention-pooling head's
  `pooler_output`, which is `SiglipModel`'s image embedding (no projection), text-aligned; patch tokens: all of
  `last_hidden_state` (after `post_layernorm`). SigLIP 2 (NaFlex) takes patches: a crop is cut into its grid,
  every patch real (`pixel_attention_mask` all ones, `spatial_shapes` the grid), as `Siglip2ImageProcessor`
  gives an image of that size.
- AIMv2 (`aimv2`, `aimv2_vision_model`): no CLS token. `visual_projection(pooler_output)` of the dual model
  (`Aimv2Model.get_image_features`), text-aligned; a vision folder alone: its attention-pooling head's
  `pooler_output`, not text-aligned. Patch tokens: all of `last_hidden_state` (after the final RMSNorm).
- RADIO (`radio`): `summary` (its CLS tokens of `summary_idxs`, concatenated) and `features` (the patch tokens,
  CLS and registers left out); not text-aligned (transformers' RADIO has no adaptors). It normalises its input
  itself (`input_conditioner`), so it reads pixels in [0, 1].

A tower saved without a pooling head (SigLIP's `vision_use_head=False`, AIMv2's `use_head=False`) gives the mean
of its patch tokens, not text-aligned. The normalisation and the native size are the folder's image
processor's, read as `AutoImageProcessor` reads them (`processor_config.json`'s `image_processor`, as
transformers v5 saves a processor, else `preprocessor_config.json`); a folder without one gets its family's
processor defaults. timm's image towers of image-text models are `TimmBackbone`s (`timm_text_aligned`).
"""

import math
from dataclasses import dataclass

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn
from transformers import (
    Aimv2VisionConfig,
    Aimv2VisionModel,
    AutoConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    MetaClip2VisionModel,
    MetaClip2VisionModelWithProjection,
    PretrainedConfig,
    PreTrainedModel,
    RadioModel,
    Siglip2VisionModel,
    SiglipVisionModel,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.aimv2.modeling_aimv2 import Aimv2PreTrainedModel

from .normalization import UNNORMALIZED, Normalization, image_processor_config, processor_normalization
from .references import is_external_timm_name
from .weight_check import checkpoint_keys, load_checked

OPENAI_CLIP = Normalization(tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
STANDARD = Normalization(tuple(IMAGENET_STANDARD_MEAN), tuple(IMAGENET_STANDARD_STD))  # 0.5, SigLIP's
# The projection of an image tower to the embedding its text tower is aligned with (CLIP, MetaCLIP 2, AIMv2).
PROJECTION = "visual_projection.weight"


class Aimv2VisionModelWithProjection(Aimv2PreTrainedModel):
    """AIMv2's image tower with its projection to the text-aligned embedding, under the names of an `Aimv2Model`
    checkpoint (`vision_model.*`, `visual_projection.weight`): what transformers has for CLIP
    (`CLIPVisionModelWithProjection`) and not for AIMv2. `config.projection_dim` is the dual model's."""

    config: Aimv2VisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: Aimv2VisionConfig):
        super().__init__(config)
        self.vision_model = Aimv2VisionModel._from_config(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """`pixel_values (B, 3, H, W)` -> what `Aimv2Model.get_image_features` returns: the tower's output, its
        `pooler_output (B, projection_dim)` projected."""
        outputs = self.vision_model(pixel_values=pixel_values, **kwargs)
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs


@dataclass(frozen=True)
class TeacherFamily:
    """How one family gives a frozen teacher its global feature and patch tokens.

    `vision_class`: the image tower alone. `projected_class`: the tower with `visual_projection`, under the names
    of the dual checkpoint; None where the pooled output is itself the text-aligned embedding (SigLIP).
    `pooled_text_aligned`: the pooling head's output is that embedding (SigLIP). `text_prefixes`: the dual
    checkpoint's text side, the tensors left out. `prefix_tokens`: tokens before the patch tokens (CLS).
    `feature`: "pooler" (`pooler_output`) or "summary" (RADIO's `summary` and `features`).
    `interpolate_pos_encoding`: the forward needs it for other sizes. `patchified`: the forward takes patches
    (SigLIP 2). `normalization`: its processor's default, for a folder saved without one. `normalizes_input`: the
    model normalises its input itself (RADIO), whatever a processor config says.
    """

    name: str
    vision_class: type[PreTrainedModel]
    projected_class: type[PreTrainedModel] | None = None
    pooled_text_aligned: bool = False
    text_prefixes: tuple[str, ...] = ()
    prefix_tokens: int = 0
    feature: str = "pooler"
    interpolate_pos_encoding: bool = False
    patchified: bool = False
    normalization: Normalization = OPENAI_CLIP
    normalizes_input: bool = False


CLIP_TEXT = ("text_model.", "text_projection.", "logit_scale")
SIGLIP_TEXT = ("text_model.", "logit_scale", "logit_bias")
CLIP = TeacherFamily(
    "CLIP",
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    text_prefixes=CLIP_TEXT,
    prefix_tokens=1,
    interpolate_pos_encoding=True,
)
METACLIP_2 = TeacherFamily(
    "MetaCLIP 2",
    MetaClip2VisionModel,
    MetaClip2VisionModelWithProjection,
    text_prefixes=CLIP_TEXT,
    prefix_tokens=1,
    interpolate_pos_encoding=True,
)
SIGLIP = TeacherFamily(
    "SigLIP",
    SiglipVisionModel,
    pooled_text_aligned=True,
    text_prefixes=SIGLIP_TEXT,
    interpolate_pos_encoding=True,
    normalization=STANDARD,
)
SIGLIP_2 = TeacherFamily(
    "SigLIP 2",
    Siglip2VisionModel,
    pooled_text_aligned=True,
    text_prefixes=SIGLIP_TEXT,
    patchified=True,
    normalization=STANDARD,
)
AIMV2 = TeacherFamily("AIMv2", Aimv2VisionModel, Aimv2VisionModelWithProjection, text_prefixes=CLIP_TEXT)
RADIO = TeacherFamily("RADIO", RadioModel, feature="summary", normalization=UNNORMALIZED, normalizes_input=True)

TEACHER_FAMILIES = {
    "clip": CLIP,
    "clip_vision_model": CLIP,
    "metaclip_2": METACLIP_2,
    "metaclip_2_vision_model": METACLIP_2,
    "siglip": SIGLIP,
    "siglip_vision_model": SIGLIP,
    "siglip2": SIGLIP_2,
    "siglip2_vision_model": SIGLIP_2,
    "aimv2": AIMV2,
    "aimv2_vision_model": AIMV2,
    "radio": RADIO,
}


def naflex_inputs(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """`pixel_values (B, C, H, W)` as SigLIP 2's NaFlex forward takes them: every patch of the grid, flattened
    in `Siglip2ImageProcessor`'s order (`convert_image_to_patches`: patch rows, patch columns; in a patch, its
    rows, columns, channels), none of them padding."""
    batch, channels, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, -1)  # (B, rows * cols, p * p * C)
    mask = torch.ones(batch, rows * cols, dtype=torch.int32, device=pixel_values.device)  # (B, rows * cols)
    shapes = torch.tensor([[rows, cols]], device=pixel_values.device).repeat(batch, 1)  # (B, 2)
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


class TeacherBackbone(nn.Module):
    """The image tower of an image-text model (or RADIO) as a frozen teacher: `(B, 3, H, W)` -> its global feature.

    Args:
        model (`PreTrainedModel`): the image tower (`family.vision_class`), or the tower with its projection
            (`family.projected_class`); its `config` is the tower's.
        family (`TeacherFamily`): how the feature and the patch tokens are read.
        source (`str`): the folder or Hub id it was loaded from (with the text tower, for a dual checkpoint).
        normalization (`Normalization`): the mean and std its inputs are normalised with.
        image_size (`int`): the side its processor gives images (its config's where it has no processor): a
            `--distill_teacher_size` that needs no resizing of the position embeddings.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        family: TeacherFamily,
        *,
        source: str,
        normalization: Normalization,
        image_size: int,
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.source = source
        self.normalization = normalization
        self.image_size = image_size
        config = model.config
        self.projected = family.projected_class is not None and isinstance(model, family.projected_class)
        self.patch_size = int(config.patch_size)
        self.num_patch_features = int(config.hidden_size)
        if self.projected:
            self.num_features = int(config.projection_dim)
        elif family.feature == "summary":
            self.num_features = len(config.summary_idxs) * int(config.hidden_size)
        else:
            self.num_features = int(config.hidden_size)
        # Its global feature is the embedding the family's text tower is aligned with: the projected one, or the
        # pooling head's where that is the embedding (SigLIP; a tower saved without a head has none).
        has_head = bool(getattr(self.tower, "use_head", True))
        self.text_aligned = self.projected or (family.pooled_text_aligned and has_head)

    @property
    def tower(self) -> PreTrainedModel:
        """The image tower, without the projection."""
        return self.model.vision_model if self.projected else self.model

    def model_outputs(self, pixel_values: torch.Tensor, **kwargs):
        """The tower's own output for `pixel_values (B, 3, H, W)` (`kwargs`, e.g. `output_hidden_states`, go to
        its forward)."""
        if self.family.patchified:
            return self.tower(**naflex_inputs(pixel_values, self.patch_size), return_dict=True, **kwargs)
        options = {"interpolate_pos_encoding": True} if self.family.interpolate_pos_encoding else {}
        return self.tower(pixel_values=pixel_values, return_dict=True, **options, **kwargs)

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values (B, 3, H, W)` -> (the global feature `(B, num_features)`, the patch tokens
        `(B, P, num_patch_features)`), from one forward."""
        outputs = self.model_outputs(pixel_values)
        if self.family.feature == "summary":
            return outputs.summary, outputs.features  # (B, D), (B, P, C)
        tokens = outputs.last_hidden_state[:, self.family.prefix_tokens :]  # (B, P, C)
        feature = outputs.pooler_output if outputs.pooler_output is not None else tokens.mean(1)  # (B, C)
        if self.projected:
            feature = self.model.visual_projection(feature)  # (B, projection_dim)
        return feature, tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values (B, 3, H, W)` -> the global feature `(B, num_features)`."""
        return self.forward_tokens(pixel_values)[0]

    def check_input_size(self, size: int, name: str = "teacher size") -> None:
        """Refuse an image size the tower cannot take: not a multiple of its patch size, or, for an AIMv2 tower
        with learned position embeddings (`is_native=False`), any size but its own."""
        config = self.model.config
        fixed = config.image_size if config.model_type == "aimv2_vision_model" and not config.is_native else None
        if fixed is not None and size != fixed:
            raise ValueError(
                f"{name} {size} does not fit this {config.model_type} model, whose position embeddings are learned "
                f"for {fixed} px images only; use {fixed}"
            )
        if size % self.patch_size:
            raise ValueError(
                f"{name} {size} is not a multiple of the patch size {self.patch_size} of this {config.model_type} "
                f"model; use a multiple such as {max(self.patch_size, size - size % self.patch_size)}"
            )


def load_teacher_backbone(name_or_path: str, **kwargs) -> TeacherBackbone:
    """The frozen teacher at `name_or_path` (a folder or Hub id of a `TEACHER_FAMILIES` model type): its image
    side, every vision tensor checked, in eval mode and without gradients.

    Args:
        name_or_path (`str`): a folder saved with `save_pretrained` (a dual model whole, or its image tower), or a
            Hub id.
        **kwargs: passed to `from_pretrained` (e.g. `revision`, `token`).

    Raises:
        ValueError: not a model type of `TEACHER_FAMILIES`; a checkpoint whose image side does not fill the
            model (a missing vision tensor, the projection of a dual checkpoint included; see
            `weight_check.load_checked`).
    """
    hub_options = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
    config = AutoConfig.from_pretrained(name_or_path, **hub_options)
    family = TEACHER_FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"{name_or_path} is a {config.model_type!r} model, not one of {', '.join(TEACHER_FAMILIES)}")
    dual = hasattr(config, "vision_config")
    tower_config = config.vision_config if dual else config
    with_projection = family.projected_class is not None and (
        dual or PROJECTION in checkpoint_keys(name_or_path, **hub_options)
    )
    if with_projection and dual:
        tower_config.projection_dim = config.projection_dim
    model = load_checked(
        family.projected_class if with_projection else family.vision_class,
        name_or_path,
        config=tower_config,
        dropped_prefixes=family.text_prefixes if dual else (),
        **kwargs,
    )
    processor = image_processor_config(name_or_path, **hub_options)
    if family.normalizes_input or not processor:
        normalization = family.normalization
    else:
        normalization = processor_normalization(processor, str(name_or_path))
    backbone = TeacherBackbone(
        model,
        family,
        source=str(name_or_path),
        normalization=normalization,
        image_size=processor_image_size(processor) or config_image_size(model.config),
    )
    return backbone.eval().requires_grad_(False)


def processor_image_size(processor: dict) -> int | None:
    """The side of the images an image processor's settings give the model (its crop, else its resize; for
    SigLIP 2's NaFlex, the square of `max_num_patches`); None when they name none."""
    if "max_num_patches" in processor and "patch_size" in processor:
        return math.isqrt(int(processor["max_num_patches"])) * int(processor["patch_size"])
    size = processor.get("crop_size") if processor.get("do_center_crop", True) else None
    size = size or processor.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size) if size else None


def config_image_size(config: PretrainedConfig) -> int:
    """The image side a tower's config is made for (SigLIP 2: the square of its `num_patches`)."""
    if getattr(config, "num_patches", None):
        return math.isqrt(int(config.num_patches)) * int(config.patch_size)
    return int(config.image_size)


def timm_text_aligned(name: str) -> bool:
    """Whether timm's `name` (its pretrained tag, or timm's default one) is the image tower of an image-text model
    whose head gives the embedding the text tower is aligned with: the projection (`head`) of the CLIP towers
    (`vit_*_clip_*`, `eva*_clip_*`) and of PE core (`vit_pe_core_*`), SigLIP's attention pooling
    (`vit_*_siglip_*`, whose head is empty). Not the towers pooled by average (`*_gap`), nor those fine-tuned
    into classifiers (tags `*ft_*`), PE's spatial and language towers, or names timm does not list."""
    if is_external_timm_name(name) or not timm.is_model(name):
        return False
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return False
    architecture, tag = cfg.architecture or name, cfg.tag or ""
    family = "_clip_" in architecture or "_siglip_" in architecture or architecture.startswith("vit_pe_core_")
    return family and "_gap" not in architecture and "ft_" not in tag


__all__ = [
    "TEACHER_FAMILIES",
    "Aimv2VisionModelWithProjection",
    "TeacherBackbone",
    "TeacherFamily",
    "load_teacher_backbone",
    "naflex_inputs",
    "processor_image_size",
    "timm_text_aligned",
]
