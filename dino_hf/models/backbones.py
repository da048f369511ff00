"""Backbones f of DINO: any timm model, or a `DinoModel`, behind one interface.

`build_backbone(spec)` returns a module that maps images `(B, 3, H, W)` to features `(B, D)` (the
CLS token after the final LayerNorm for a ViT, the pooled feature for a CNN), exposes the feature
size as `.num_features` (read from the model, never from a dummy forward) and the underlying model
as `.model` (what gets exported).

Accepted specs:
- `"timm:NAME"`: `timm.create_model(NAME, num_classes=0)`. Models with a fixed input size (ViTs)
  are built with `dynamic_img_size=True`, so 96 px local crops go through a 224 px model.
- a DinoModel preset name (`"vit_small_patch16"`, see `dino_hf.PRESETS`), a `DinoConfig` or a
  `DinoModel`.
- a local folder or a Hub id ("org/name") of a transformers model, dispatched on its own
  `model_type`: a DinoModel of this project, or a transformers vision backbone (ViT, DeiT, Dinov2,
  DINOv3, ConvNeXt, Swin; `dino_hf.models.transformers_backbone`), every weight checked.
- a local folder saved by timm or by transformers' `TimmWrapperModel` (its `config.json` names an
  `architecture`), or `"timm:local-dir:PATH"`: that timm model with the folder's weights, checked.
- with `frozen=True` (a model to distill from), also a folder or Hub id of an image-text model (CLIP,
  MetaCLIP 2, SigLIP, SigLIP 2, AIMv2: its image side) or RADIO (`dino_hf.models.text_aligned`), and a timm
  image tower of an image-text model keeps its head, the text-aligned embedding (`text_aligned`).

Whatever the source, a checkpoint whose tensors do not fill the model is refused
(`dino_hf.models.weight_check`).
"""

import copy
import dataclasses
import difflib
import json
import os
from pathlib import Path

import timm
import torch
from timm.models import PretrainedCfg
from torch import nn
from transformers import AutoConfig

from .configuration_dino import PRESETS, DinoConfig
from .modeling_dino import DinoModel
from .normalization import IMAGENET, Normalization, saved_normalization, set_normalization_, timm_normalization
from .references import TIMM_PREFIX, is_external_timm_name, is_hub_id, is_timm_folder
from .text_aligned import TEACHER_FAMILIES, TeacherBackbone, load_teacher_backbone, timm_text_aligned
from .transformers_backbone import (
    MASKABLE,
    TransformersBackbone,
    accepted_models_text,
    check_vision_config,
    load_transformers_backbone,
)
from .weight_check import check_state_dict, load_checked, read_tensors, weight_files


class TimmBackbone(nn.Module):
    """A timm model built with `num_classes=0`: its forward already returns pooled features. A frozen teacher
    that is the image tower of an image-text model keeps its head instead (`text_aligned`): CLIP's projection.

    Args:
        model (`nn.Module`): the timm model; `.num_features` is its `head_hidden_size` (the width
            of what forward returns; equal to `num_features` except for models with a pre-logits
            layer), or the width of its head where it has one; `.num_patch_features` the width of its
            patch tokens.
        text_aligned (`bool`, defaults to `False`): what forward returns is the embedding the model's text
            tower is aligned with (`text_aligned.timm_text_aligned`).
        source (`str`, optional): what named it (`timm:NAME`).
    """

    def __init__(self, model: nn.Module, text_aligned: bool = False, source: str | None = None):
        super().__init__()
        self.model = model
        self.text_aligned = text_aligned
        self.source = source
        self.num_features = (
            getattr(model, "num_classes", 0) or getattr(model, "head_hidden_size", None) or model.num_features
        )
        self.num_patch_features = model.num_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values (B, 3, H, W)` -> features `(B, num_features)`."""
        return self.model(pixel_values)

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values (B, 3, H, W)` -> `(features (B, num_features), patch_tokens (B, P, C))`.

        timm's `forward` is `forward_head(forward_features(x))` and, built with `num_classes=0`, its head
        is the identity: `forward_head(..., pre_logits=True)` of the same `forward_features` gives the
        features of `forward` bit for bit; built with its head (a text-aligned teacher), the head's output
        (`pre_logits=False`), which `forward` gives too. The patch tokens are `forward_features` without its prefix
        tokens (CLS, registers: `num_prefix_tokens`) for a ViT, after its final norm; for a CNN, the final
        feature map `(B, C, h, w)` (NHWC for the models whose `output_fmt` says so) as `(B, h * w, C)`.
        """
        tokens = self.model.forward_features(pixel_values)
        with_head = bool(getattr(self.model, "num_classes", 0))
        features = self.model.forward_head(tokens, pre_logits=not with_head)  # (B, num_features)
        if tokens.ndim == 4 and getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            patch_tokens = tokens.flatten(1, 2)  # (B, h * w, C)
        elif tokens.ndim == 4:
            patch_tokens = tokens.flatten(2).transpose(1, 2)  # (B, h * w, C)
        else:
            patch_tokens = tokens[:, getattr(self.model, "num_prefix_tokens", 0) :]  # (B, P, C)
        return features, patch_tokens


class DinoModelBackbone(nn.Module):
    """A `DinoModel`; the feature is `pooler_output`, the CLS token after the final LayerNorm.

    Args:
        model (`DinoModel`): the ViT; `.num_features` is `config.hidden_size`.
    """

    def __init__(self, model: DinoModel):
        super().__init__()
        self.model = model
        self.num_features = model.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values (B, 3, H, W)`, H and W multiples of the patch size -> `(B, hidden_size)`."""
        return self.model(pixel_values, return_dict=True).pooler_output

    def forward_tokens(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values (B, 3, H, W)` -> `(features (B, hidden_size), patch_tokens (B, N, hidden_size))`:
        from one forward, the `pooler_output` of `forward` and the N patch tokens of `last_hidden_state`
        (after the final LayerNorm, CLS token and registers removed).

        `bool_masked_pos (B, N)`: patches replaced by the model's mask token (iBOT; a model built with
        `use_mask_token`, see `build_backbone(..., mask_token=True)`).
        """
        masking = {} if bool_masked_pos is None else {"bool_masked_pos": bool_masked_pos}
        output = self.model(pixel_values, return_dict=True, **masking)
        return output.pooler_output, output.last_hidden_state[:, self.model.num_prefix_tokens :]  # (B, D), (B, N, D)


def build_backbone(
    spec: str | DinoConfig | DinoModel,
    *,
    drop_path_rate: float = 0.1,
    image_size: int = 224,
    pretrained: bool = False,
    mask_token: bool = False,
    frozen: bool = False,
    **kwargs,
) -> TimmBackbone | DinoModelBackbone | TransformersBackbone | TeacherBackbone:
    """The backbone named by `spec` (see the module docstring), as a `(B, 3, H, W) -> (B, D)` module,
    with the normalisation its inputs need as `image_mean` / `image_std` (`dino_hf.models.normalization`):
    the start's own for trained weights, ImageNet's from scratch.

    Args:
        spec: `"timm:NAME"`, a DinoModel preset name, a `DinoConfig`, a `DinoModel`, a local folder
            of a saved `DinoModel` or a Hub id.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth at the last block
            (docs/recipe.md#backbones). Applied to every spec except a `DinoModel` instance, which is taken as it is.
        image_size (`int`, defaults to 224): size of the global crops; sets the native size of a timm
            ViT's or a preset's position embeddings. A `DinoConfig` or saved model keeps its own.
        pretrained (`bool`, defaults to `False`): load timm's pretrained weights (needs the Hub).
            Saved models (DinoModel or timm folder, Hub id) always load their weights; presets and configs
            have none.
        mask_token (`bool`, defaults to `False`): a backbone with a learned mask token for masked patches
            (iBOT): a DinoModel gets one at zero if it has none (`DinoModel.enable_mask_token`), a
            transformers ViT trains its own (`load_transformers_backbone(..., mask_token=True)`); a timm
            model or a CNN is refused (`MASKED_PATCH_MODELS` says what works).
        frozen (`bool`, defaults to `False`): the model is distilled from (`--distill_from`), never trained:
            the image side of an image-text model or RADIO is accepted (`TeacherBackbone`; refused otherwise,
            these families are not trained here), a timm image tower of an image-text model keeps its head, the
            text-aligned embedding (`TimmBackbone.text_aligned`), and the backbone comes in eval mode, without
            gradients.
        **kwargs: passed to `timm.create_model`, to `DinoConfig.from_preset` or to
            `DinoModel.from_pretrained`.
    """
    backbone = _build_backbone(spec, drop_path_rate, image_size, pretrained, mask_token, frozen, **kwargs)
    if frozen:
        backbone.eval().requires_grad_(False)
    return set_normalization_(backbone, _normalization(spec, backbone, pretrained, kwargs))


def _normalization(spec, backbone: nn.Module, pretrained: bool, kwargs: dict) -> Normalization:
    """What `spec`'s weights were trained on: a saved folder's or Hub id's processor, trained timm weights'
    `pretrained_cfg`; ImageNet's for random weights and for a model given as an object."""
    if not isinstance(spec, str) or spec in PRESETS:
        return IMAGENET
    if isinstance(backbone, TeacherBackbone):  # its processor's, read where transformers v5 saves it too
        return backbone.normalization
    if isinstance(backbone, TimmBackbone):
        from_weights = pretrained or not spec.startswith(TIMM_PREFIX) or spec.startswith(TIMM_PREFIX + "local-dir:")
        return timm_normalization(backbone.model) if from_weights else IMAGENET
    return saved_normalization(spec, **_hub_options(kwargs))


def _build_backbone(
    spec, drop_path_rate: float, image_size: int, pretrained: bool, mask_token: bool, frozen: bool, **kwargs
) -> nn.Module:
    """`build_backbone` before the normalisation is recorded."""
    if isinstance(spec, DinoModel):
        if mask_token:
            spec.enable_mask_token()
        return DinoModelBackbone(spec)
    if isinstance(spec, DinoConfig):
        _refuse_pretrained(pretrained, "a DinoConfig")
        config = copy.deepcopy(spec)
        config.drop_path_rate = drop_path_rate
        config.use_mask_token = config.use_mask_token or mask_token
        return DinoModelBackbone(DinoModel(config))
    if not isinstance(spec, str):
        raise TypeError(f"backbone spec should be a string, a DinoConfig or a DinoModel, got {type(spec).__name__}")
    if mask_token and (spec.startswith(TIMM_PREFIX) or (os.path.isdir(spec) and is_timm_folder(spec))):
        raise ValueError(
            f"{spec} is a timm model, which dino_hf cannot give a mask token for masked patches (iBOT); use "
            f"{MASKED_PATCH_MODELS}"
        )
    if spec.startswith(TIMM_PREFIX):
        name = spec[len(TIMM_PREFIX) :]
        if name.startswith("local-dir:"):
            return TimmBackbone(load_timm_folder(name, drop_path_rate=drop_path_rate, **kwargs))
        text_aligned = frozen and timm_text_aligned(name)
        model = _create_timm_model(name, drop_path_rate, image_size, pretrained, keep_head=text_aligned, **kwargs)
        return TimmBackbone(model, text_aligned=text_aligned, source=spec)
    if spec in PRESETS:
        _refuse_pretrained(pretrained, f"the preset {spec!r}")
        if mask_token:
            kwargs["use_mask_token"] = True
        config = DinoConfig.from_preset(spec, drop_path_rate=drop_path_rate, image_size=image_size, **kwargs)
        return DinoModelBackbone(DinoModel(config))
    if os.path.isdir(spec) and is_timm_folder(spec):
        return TimmBackbone(load_timm_folder(spec, drop_path_rate=drop_path_rate, **kwargs))
    if os.path.isdir(spec) or is_hub_id(spec):
        return _saved_transformers_model(spec, drop_path_rate, mask_token, frozen, **kwargs)
    raise ValueError(_unknown_spec_message(spec))


# What masked-patch training (iBOT) takes, for error messages.
MASKED_PATCH_MODELS = (
    "a ViT with a mask token: a DinoModel (a preset, a saved folder, a Hub id or a reference DINO checkpoint) "
    f"or a transformers {', '.join(MASKABLE)} checkpoint"
)


def _saved_transformers_model(
    spec: str, drop_path_rate: float, mask_token: bool = False, frozen: bool = False, **kwargs
) -> nn.Module:
    """A folder or Hub id, dispatched on its own `model_type`: a DinoModel of this project, any
    transformers vision backbone (`load_transformers_backbone`), or, `frozen`, the image side of an image-text
    model or RADIO (`load_teacher_backbone`); every weight checked in each case. `mask_token`: see
    `build_backbone`."""
    try:
        config = AutoConfig.from_pretrained(spec, **_hub_options(kwargs))
    except ValueError as error:
        raise ValueError(
            f"{spec}: its config.json is not one transformers knows ({error}); expected {accepted_models_text()}"
        ) from None
    if config.model_type in TEACHER_FAMILIES:
        check_vision_config(config, spec, frozen=frozen)  # a student of a teacher family is refused
        return load_teacher_backbone(spec, **kwargs)
    if config.model_type != DinoConfig.model_type:
        return load_transformers_backbone(spec, drop_path_rate=drop_path_rate, mask_token=mask_token, **kwargs)
    model = load_checked(DinoModel, spec, drop_path_rate=drop_path_rate, **kwargs)
    if mask_token:
        model.enable_mask_token()
    return DinoModelBackbone(model)


def _hub_options(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}


def load_timm_folder(folder: str | os.PathLike, *, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """The timm model saved in `folder` (by timm's `save_for_hf`, by dino_hf, or by transformers'
    `TimmWrapperModel.save_pretrained`), with `num_classes=0` and every weight checked.

    ViTs are built with `dynamic_img_size=True`, so that local crops go through; the classifier that
    `num_classes=0` leaves out is named in the log.
    """
    folder = Path(str(folder).removeprefix("local-dir:"))
    config = json.loads((folder / "config.json").read_text())
    options = {key: value for key, value in (config.get("model_args") or {}).items() if key != "num_classes"}
    options.update(num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
    cfg_fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    overlay = {key: value for key, value in (config.get("pretrained_cfg") or {}).items() if key in cfg_fields}
    architecture = config["architecture"]
    try:
        model = timm.create_model(architecture, pretrained_cfg_overlay=overlay, dynamic_img_size=True, **options)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
        model = timm.create_model(architecture, pretrained_cfg_overlay=overlay, **options)
    classifier = overlay.get("classifier") or "head"
    heads = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier))
    tensors = dict(read_tensors(weight_files(folder)))
    if config.get("model_type") == "timm_wrapper":  # TimmWrapperModel may save timm's names under `timm_model.`
        tensors = {key.removeprefix("timm_model."): tensor for key, tensor in tensors.items()}
    check_state_dict(model, tensors, folder, dropped_prefixes=heads)
    return model


def _create_timm_model(
    name: str, drop_path_rate: float, image_size: int, pretrained: bool, keep_head: bool = False, **kwargs
) -> nn.Module:
    """`timm.create_model(name, num_classes=0, ...)`, or with its own head (`keep_head`: the projection of a
    text-aligned teacher); fixed-size models get `dynamic_img_size=True`."""
    is_external = is_external_timm_name(name)
    if not is_external and not timm.is_model(name):
        raise ValueError(_unknown_spec_message(TIMM_PREFIX + name))
    options = dict(drop_path_rate=drop_path_rate)
    if not keep_head:
        options["num_classes"] = 0
    pretrained_cfg = None if is_external else timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        options.update(dynamic_img_size=True, img_size=image_size)
    options.update(kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **options)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise
        raise ValueError(
            f"timm model {name!r} only takes images of one size, so it cannot see DINO's local crops "
            "(96 px next to 224 px); choose a ViT that supports dynamic_img_size (vit_*, deit_*, eva*) "
            "or a CNN"
        ) from error


def _refuse_pretrained(pretrained: bool, what: str) -> None:
    if pretrained:
        raise ValueError(
            f"pretrained=True has no weights to load for {what}; pass a folder written by "
            "DinoModel.save_pretrained or a Hub id to start from trained weights"
        )


def _unknown_spec_message(spec: str) -> str:
    """Error text for an unknown backbone, with the closest timm names and presets."""
    name = spec[len(TIMM_PREFIX) :] if spec.startswith(TIMM_PREFIX) else spec
    display = {model: TIMM_PREFIX + model for model in timm.list_models()}  # bare name -> spec
    display.update({preset: preset for preset in PRESETS})
    suggestions = [display[match] for match in difflib.get_close_matches(name, display, n=5, cutoff=0.6)]
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return (
        f"unknown backbone {spec!r}: expected 'timm:<timm model name>', a DinoModel preset "
        f"({', '.join(PRESETS)}), a folder saved by DinoModel.save_pretrained or a Hub id 'org/name'{hint}"
    )


__all__ = [
    "MASKED_PATCH_MODELS",
    "DinoModelBackbone",
    "TeacherBackbone",
    "TimmBackbone",
    "TransformersBackbone",
    "build_backbone",
    "load_timm_folder",
]
