"""Backbones from transformers vision checkpoints, each trained on its own family's global feature.

A folder or Hub id is dispatched on its own `model_type` (AutoConfig), built as the class that
`AutoModel` would build, and loaded with every tensor checked against the checkpoint
(`dino_hf.models.weight_check`): a checkpoint that does not fill the model is refused, never trained
from random weights.

- ViT (`vit`, `deit`): the CLS token after the final LayerNorm; patch tokens after CLS (and DeiT's
  distillation token).
- DINOv2 / DINOv3 ViT (`dinov2`, `dinov2_with_registers`, `dinov3_vit`): `pooler_output`, the CLS
  token after the final norm; patch tokens after CLS and the registers.
- ConvNeXt and Swin (`convnext`, `convnextv2`, `dinov3_convnext`, `swin`): `pooler_output`, the pooled
  and normalised feature; patch tokens are the final feature map, one token per position.

Local crops: ViT and DeiT are called with `interpolate_pos_encoding=True`, Dinov2 interpolates its
position embeddings by itself, DINOv3 uses RoPE, and the CNNs and Swin take any size their strides
allow; `check_input_size` refuses a size the model cannot take before training starts.

The image towers of image-text models (CLIP, MetaCLIP 2, SigLIP, SigLIP 2, AIMv2) and RADIO are read as
frozen teachers only (`dino_hf.models.text_aligned`): `check_vision_config(..., frozen=True)` accepts them.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_MAPPING_NAMES, MODEL_MAPPING

from .configuration_dino import DinoConfig
from .text_aligned import TEACHER_FAMILIES
from .weight_check import checkpoint_keys, load_checked


@dataclass(frozen=True)
class Family:
    """How one family of transformers models gives DINO its feature and its patch tokens.

    `feature`: "cls" (`last_hidden_state[:, 0]`, the CLS token after the final norm) or "pooler"
    (`pooler_output`). `interpolate_pos_encoding`: the forward needs it for other image sizes (ViT,
    DeiT). `token_grid`: the patch tokens come as a `(B, C, h, w)` map (ConvNeXt) rather than a
    sequence. `fixed_patch_grid`: a ViT, which takes multiples of its patch size.
    """

    name: str
    feature: str
    interpolate_pos_encoding: bool = False
    token_grid: bool = False
    fixed_patch_grid: bool = True


VIT = Family("ViT", "cls", interpolate_pos_encoding=True)
DINO_VIT = Family("DINOv2 / DINOv3 ViT", "pooler")
HIERARCHICAL = Family("ConvNeXt / Swin", "pooler", fixed_patch_grid=False)
CONVNEXT = Family("ConvNeXt", "pooler", token_grid=True, fixed_patch_grid=False)

FAMILIES = {
    "vit": VIT,
    "deit": VIT,
    "dinov2": DINO_VIT,
    "dinov2_with_registers": DINO_VIT,
    "dinov3_vit": DINO_VIT,
    "convnext": CONVNEXT,
    "convnextv2": CONVNEXT,
    "dinov3_convnext": HIERARCHICAL,
    "swin": HIERARCHICAL,
}

# Task heads of these families' checkpoints that DINO drops: named in the log, not refused.
DROPPED_HEAD_PREFIXES = ("classifier.", "cls_classifier.", "distillation_classifier.", "head.", "fc.")

logger = logging.getLogger(__name__)


def accepted_models_text() -> str:
    """What `--model_name_or_path` accepts, for error messages."""
    return (
        "a vision backbone: a transformers checkpoint of model type "
        f"{', '.join(sorted(FAMILIES))} (a folder or Hub id), a timm model (timm:NAME or a folder saved by timm), "
        "a DinoModel preset, folder or Hub id, or a reference DINO checkpoint file; as a frozen model to distill "
        f"from (--distill_from), also the image side of {', '.join(sorted(TEACHER_FAMILIES))}"
    )


def check_vision_config(config: dict | PretrainedConfig, source: str, *, frozen: bool = False) -> str:
    """The `model_type` of `config` when it is a vision backbone that dino_hf trains (one of `FAMILIES`,
    or this project's DinoModel), or, with `frozen` (a model to distill from), one it reads as a frozen
    teacher (`TEACHER_FAMILIES`: image-text models and RADIO).

    Raises:
        ValueError: a text, audio or multimodal model, a vision model of a family not listed in
            `FAMILIES`, or a teacher family without `frozen`, with what is accepted.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else config.model_type
    if model_type in FAMILIES or model_type == DinoConfig.model_type:
        return model_type
    if model_type in TEACHER_FAMILIES:
        if frozen:
            return model_type
        raise ValueError(
            f"{source} is a {model_type!r} model ({TEACHER_FAMILIES[model_type].name}), which dino_hf reads as a "
            "frozen teacher, not as a backbone to train; use it with --distill_from (build_backbone(..., "
            "frozen=True)) and train another backbone as the student"
        )
    if model_type is None:
        raise ValueError(f"{source}: its config.json names no model_type; expected {accepted_models_text()}")
    if model_type in MODEL_FOR_IMAGE_MAPPING_NAMES:
        raise ValueError(
            f"{source} is a {model_type!r} vision model, a family dino_hf does not train yet; expected "
            f"{accepted_models_text()}. Its timm counterpart, if there is one, works as timm:NAME"
        )
    raise ValueError(f"{source} is a {model_type!r} model, not a vision backbone; expected {accepted_models_text()}")


class TransformersBackbone(nn.Module):
    """A transformers vision model as a DINO backbone: `(B, 3, H, W)` -> its family's global feature.

    Args:
        model (`PreTrainedModel`): the model as `AutoModel` builds it; it is exported as it is.
        family (`Family`): how the feature and the patch tokens are read (`FAMILIES[model_type]`).
        frozen_heads (`list[str]`): name prefixes of parameters that DINO does not train (a ViT's pooler,
            the mask token), kept as they were loaded so that the export is the input's class with all its
            weights.
        source (`str`, optional): the folder or Hub id it was loaded from (the model card's `base_model`).
    """

    def __init__(
        self, model: PreTrainedModel, family: Family, frozen_heads: list[str] | None = None, source: str | None = None
    ):
        super().__init__()
        self.model = model
        self.family = family
        self.source = source
        self.frozen_heads = list(frozen_heads or [])
        for name, param in model.named_parameters():
            if any(name.startswith(prefix) for prefix in self.frozen_heads):
                param.requires_grad_(False)
        config = model.config
        self.num_features = _feature_width(config)
        self.num_prefix_tokens = _prefix_tokens(config)
        self.patch_size = int(config.patch_size) if family.fixed_patch_grid else None

    def model_outputs(self, pixel_values: torch.Tensor, **kwargs):
        """The model's own output for `pixel_values (B, 3, H, W)` at any size it takes (`kwargs`, e.g.
        `output_hidden_states`, go to its forward)."""
        options = {"interpolate_pos_encoding": True} if self.family.interpolate_pos_encoding else {}
        return self.model(pixel_values=pixel_values, return_dict=True, **options, **kwargs)

    def _feature(self, outputs) -> torch.Tensor:
        if self.family.feature == "cls":
            return outputs.last_hidden_state[:, 0]  # (B, D)
        return outputs.pooler_output.flatten(1)  # (B, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values (B, 3, H, W)` -> the global feature `(B, num_features)`."""
        return self._feature(self.model_outputs(pixel_values))

    def forward_tokens(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values (B, 3, H, W)` -> (the global feature `(B, D)`, the patch tokens `(B, P, C)`).

        `bool_masked_pos (B, P)`: patches replaced by the model's mask token (the families of `MASKABLE`,
        loaded with `mask_token=True`).
        """
        masking = {} if bool_masked_pos is None else {"bool_masked_pos": bool_masked_pos}
        outputs = self.model_outputs(pixel_values, **masking)
        tokens = outputs.last_hidden_state
        if self.family.token_grid:
            tokens = tokens.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C)
        else:
            tokens = tokens[:, self.num_prefix_tokens :]  # (B, P, C)
        return self._feature(outputs), tokens

    @torch.no_grad()
    def check_input_size(self, size: int, name: str = "crop size") -> None:
        """Refuse an image size the model cannot take, with sizes that would work.

        ViTs take multiples of their patch size, Swin sizes whose last stage holds a whole window. For
        the CNNs, a single blank image of that size goes through the model once (before training),
        which finds the sizes their strides cannot take.
        """
        if self.patch_size is not None:
            if size % self.patch_size:
                raise ValueError(
                    f"{name} {size} is not a multiple of the patch size {self.patch_size} of this "
                    f"{self.model.config.model_type} model; use a multiple such as "
                    f"{max(self.patch_size, size - size % self.patch_size)}"
                )
            return
        config = self.model.config
        if config.model_type == "swin":
            # transformers' Swin shrinks a layer's window, for good, when the layer's input is smaller than
            # the window, and its relative-position table then no longer fits: no probe, the rule instead.
            smallest = config.patch_size * 2 ** (len(config.depths) - 1) * config.window_size
            if size < smallest:
                raise ValueError(
                    f"{name} {size} is below {smallest} px, the smallest image whose last stage still holds a "
                    f"{config.window_size} x {config.window_size} window in transformers' Swin; use crops of at "
                    f"least {smallest} px, --local_crops_number 0, or timm's Swin (timm:swin_...)"
                )
            return
        was_training = self.training
        self.eval()
        try:
            parameter = next(self.model.parameters())
            self(torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device))
        except RuntimeError as error:
            stride = 32
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"this {self.model.config.model_type} model cannot take {size} px images ({reason}); "
                f"use a size of at least {stride}, e.g. {max(stride, size + (-size) % stride)}"
            ) from None
        finally:
            self.train(was_training)


def _feature_width(config: PretrainedConfig) -> int:
    if getattr(config, "hidden_sizes", None):  # ConvNeXt
        return int(config.hidden_sizes[-1])
    if config.model_type == "swin":
        return int(config.embed_dim * 2 ** (len(config.depths) - 1))
    return int(config.hidden_size)


def _prefix_tokens(config: PretrainedConfig) -> int:
    """Tokens before the patch tokens in `last_hidden_state`: CLS, registers, DeiT's distillation token,
    the pooled token that DINOv3's ConvNeXt puts first."""
    if config.model_type == "deit":
        return 2
    if config.model_type == "dinov3_convnext":
        return 1
    if config.model_type == "swin":
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


# Families whose models take `bool_masked_pos` (a learned mask token in place of masked patches: iBOT).
MASKABLE = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit")
MASK_TOKEN = "embeddings.mask_token"


def load_transformers_backbone(
    name_or_path: str, *, drop_path_rate: float | None = None, mask_token: bool = False, **kwargs
) -> TransformersBackbone:
    """The transformers vision backbone at `name_or_path` (a folder or a Hub id), every weight loaded.

    Args:
        name_or_path (`str`): a folder saved with `save_pretrained`, or a Hub id.
        drop_path_rate (`float`, optional): stochastic depth of the student, where the config has one
            (the export keeps the checkpoint's own value).
        mask_token (`bool`, defaults to `False`): train the model's mask token, for masked patches
            (`forward_tokens(..., bool_masked_pos=...)`, iBOT). A ViT or DeiT checkpoint saved without one
            gets one, at zero (DINOv2's initialisation); otherwise the mask token is kept as loaded, frozen.
        **kwargs: passed to `from_pretrained` (e.g. `revision`, `token`).

    Raises:
        ValueError: not a vision backbone of `FAMILIES`, a checkpoint that does not fill the model
            (missing, unexpected or mis-shaped tensors; see `weight_check.load_checked`), or `mask_token`
            for a family without one (`MASKABLE`).
    """
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    model_type = check_vision_config(config, name_or_path)
    model_class = MODEL_MAPPING[type(config)]
    if mask_token and model_type not in MASKABLE:
        raise ValueError(
            f"{name_or_path} is a {model_type} model, which has no mask token for masked patches; masked-patch "
            f"training (iBOT) needs a ViT: a transformers {', '.join(MASKABLE)} checkpoint or a DinoModel"
        )
    keys = checkpoint_keys(name_or_path, **kwargs)
    init_options, frozen = _head_options(model_type, keys, mask_token)
    new_mask_token = mask_token and not any(key.endswith(MASK_TOKEN) for key in keys)
    source_drop_path = getattr(config, "drop_path_rate", None)
    if drop_path_rate is not None and source_drop_path is not None:
        config.drop_path_rate = drop_path_rate
    model = load_checked(
        model_class,
        name_or_path,
        config=config,
        dropped_prefixes=DROPPED_HEAD_PREFIXES,
        new_tensors=(MASK_TOKEN,) if new_mask_token else (),
        **init_options,
        **kwargs,
    )
    if new_mask_token:
        with torch.no_grad():
            model.embeddings.mask_token.zero_()
    if source_drop_path is not None:
        model.config.drop_path_rate = source_drop_path  # what the export's config says
    return TransformersBackbone(model, FAMILIES[model_type], frozen_heads=frozen, source=str(name_or_path))


def _head_options(model_type: str, keys: set[str], mask_token: bool) -> tuple[dict, list[str]]:
    """Constructor options that match the checkpoint's optional parts (a ViT's pooler and mask token),
    and the parameter-name prefixes that are kept as loaded but not trained (the pooler, the mask token)."""
    has_mask_token = any(key.endswith(MASK_TOKEN) for key in keys)
    # Without masked patches the mask token gets no gradient: it is kept as loaded (and DDP does not
    # wait for its gradient).
    untrained = [MASK_TOKEN] if has_mask_token and not mask_token else []
    if model_type not in ("vit", "deit"):
        return {}, untrained
    has_pooler = any(key.split(".", 1)[-1].startswith("pooler.") or key.startswith("pooler.") for key in keys)
    options = {"add_pooling_layer": has_pooler}
    if has_mask_token or mask_token:
        options["use_mask_token"] = True
    return options, untrained + (["pooler."] if has_pooler else [])


def folder_model_type(folder: str | os.PathLike) -> str | None:
    """The `model_type` in a folder's config.json (None when it has none or no config.json)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text()).get("model_type")


__all__ = [
    "FAMILIES",
    "MASKABLE",
    "TransformersBackbone",
    "accepted_models_text",
    "check_vision_config",
    "folder_model_type",
    "load_transformers_backbone",
]
