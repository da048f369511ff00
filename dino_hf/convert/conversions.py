"""Conversions into `DinoModel` from the formats DINO weights come in (the outputs are the same numbers).

- transformers `ViTModel` checkpoints (facebook/dino-vits16, -vits8, -vitb16, -vitb8): the same weight
  names as `DinoModel`, plus a `pooler.*` layer that DINO does not have (dropped);
- timm `VisionTransformer` weights (the `*.dino` tags): `cls_token`, `pos_embed`, `patch_embed.proj`,
  `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, with q, k, v fused;
- the reference DINO checkpoints (docs/formats.md#reference-checkpoints): full training checkpoints
  with `teacher` / `student` (keys `[module.]backbone.*` with timm's names, `[module.]head.*`), and
  backbone-only state dicts.
- timm `VisionTransformer`s with LayerScale (`init_values`; `blocks.{i}.ls{1,2}.gamma`), into a
  DinoModel with `layerscale_value`;
- transformers `Dinov2WithRegistersModel` models and folders with a GELU MLP (not SwiGLU), LayerScale
  included: `dino_from_dinov2_with_registers` (docs/formats.md#dinov2-with-registers).

`convert_checkpoint` reads any of these and writes a `DinoModel` folder, or a transformers ViT or timm
folder (`dino_hf.convert.export`), in one call.

Weights files are read with `load_checkpoint_file` (`dino_hf.models.weight_files`), which never unpickles code.
"""

import json
import math
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, Dinov2WithRegistersModel, PreTrainedModel, ViTConfig, ViTModel

from ..models.configuration_dino import PRESETS, DinoConfig
from ..models.heads import DinoHead
from ..models.modeling_dino import DinoModel
from ..models.weight_check import load_checked
from ..models.weight_files import load_checkpoint_file
from .export import DINOV2_BLOCK_NAMES, as_plain_vit, dinov2_block_key, save_as_timm, save_as_vit
from .timm_weights import DINO_LAYER_NORM_EPS, dino_key_to_timm, timm_to_dino_state_dict

HEAD_WEIGHTS_NAME = "dino_head.safetensors"
HEAD_CONFIG_NAME = "dino_head_config.json"
# LayerScale init of a timm state dict that does not say its own: timm's `LayerScale` default (and DINOv2's).
TIMM_DEFAULT_INIT_VALUES = 1e-5


class ImportedCheckpoint(NamedTuple):
    """A converted backbone, and the DINO projection head when the source had one.

    `head_state_dict` has the reference's names (`mlp.{i}.weight`, `last_layer.weight_g`, ...) and loads
    into `DinoHead(**head_config)`.
    """

    model: DinoModel
    head_state_dict: dict[str, torch.Tensor] | None = None
    head_config: dict | None = None


# ---------------------------------------------------------------------------------------------------
# Reading folders and state dicts


def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return load_checkpoint_file(folder / name)
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin; pass the weights file itself")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} does not exist; is {path.parent} a folder written in the format asked for?")
    return json.loads(path.read_text())


def _tensors(state_dict: dict, source: str) -> dict[str, torch.Tensor]:
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{source}: {key!r} is a {type(value).__name__}, not a tensor; pass a state dict of the backbone"
            )
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------
# Building a DinoModel from DinoModel-named weights


def _infer_config(state_dict: dict[str, torch.Tensor], source: str, **fields) -> DinoConfig:
    """DinoConfig from the tensor shapes; `fields` (heads, image size, drop_path_rate, ...) override.

    Heads default to hidden_size // 64, as in all of DINO's ViTs. LayerNorm eps is DINO's 1e-6 unless
    `fields` give another (`dino_from_vit(keep_layer_norm_eps=True)` gives the ViT config's).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ValueError(f"{source}: missing key {key!r}; is this the state dict of a ViT backbone?")
        return tuple(state_dict[key].shape)

    hidden = shape("embeddings.cls_token")[-1]
    _, channels, patch, patch_width = shape("embeddings.patch_embeddings.projection.weight")
    if patch != patch_width:
        raise ValueError(f"{source}: patch {patch}x{patch_width} is not square; DinoModel needs square patches")
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.layer\.(\d+)\.", key))}
    num_positions = shape("embeddings.position_embeddings")[1] - 1
    image_size = fields.pop("image_size", None)
    if image_size is None:
        grid = math.isqrt(num_positions)
        if grid * grid != num_positions:
            raise ValueError(f"{source}: {num_positions} patch positions are not a square grid; pass image_size")
        image_size = grid * patch
    if image_size % patch:
        raise ValueError(
            f"{source}: image size {image_size} is not a multiple of patch size {patch}; "
            f"use a multiple such as {max(patch, image_size - image_size % patch)}"
        )
    if (image_size // patch) ** 2 != num_positions:
        raise ValueError(
            f"{source}: image size {image_size} / patch {patch} gives {(image_size // patch) ** 2} positions, "
            f"but the position embeddings hold {num_positions}; use image size {math.isqrt(num_positions) * patch}"
        )
    heads = fields.pop("num_attention_heads", None)
    if heads is None:
        if hidden % 64:
            raise ValueError(f"{source}: hidden size {hidden} is not a multiple of 64; pass num_attention_heads")
        heads = hidden // 64
    config = dict(
        hidden_size=hidden,
        num_hidden_layers=max(layers, default=-1) + 1,
        num_attention_heads=heads,
        intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
        image_size=image_size,
        patch_size=patch,
        num_channels=channels,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state_dict,
        layer_norm_eps=DINO_LAYER_NORM_EPS,
    )
    config.update(fields)
    return DinoConfig(**config)


def _build_dino(
    state_dict: dict[str, torch.Tensor], config: DinoConfig, source: str, timm_names: bool = False
) -> DinoModel:
    """A DinoModel holding exactly `state_dict`; every key must be known, present and of the right shape."""

    def name(key: str) -> str:
        if not timm_names:
            return repr(key)
        return f"{dino_key_to_timm(key)!r} (DinoModel {key!r})"

    model = DinoModel(config)
    expected = model.state_dict()
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown[:6]}: not part of a DINO ViT backbone; remove them")
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"{source}: missing key {name(missing[0])} ({len(missing)} missing in all); the checkpoint is "
            f"incomplete, or is not a ViT of {config.num_hidden_layers} blocks"
        )
    for key, tensor in state_dict.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{source}: {name(key)} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} "
                f"for hidden size {config.hidden_size}, MLP size {config.intermediate_size}, patch "
                f"{config.patch_size}, image {config.image_size}; the checkpoint mixes shapes or the sizes passed "
                f"are wrong"
            )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Import


def dino_from_vit(
    source: "ViTModel | dict | str | Path", keep_layer_norm_eps: bool = False, **config_overrides
) -> DinoModel:
    """DinoModel from a transformers `ViTModel`, its folder (config.json + weights), a weights file or a
    state dict (keys as `ViTModel`, or prefixed `vit.` as in `ViTForImageClassification`; `pooler.*` is
    dropped).

    LayerNorm eps (docs/formats.md#layernorm-epsilon):
    - `keep_layer_norm_eps=True` keeps the ViT config's own (transformers' default 1e-12 where it names
      none), so the DinoModel gives the features stock `ViTModel` gives (within 1e-5 in fp32; with 1e-6
      a 1e-12 ViT's differ by about 1e-3). The evaluations convert this way (`load_feature_model`):
      a Google ViT (1e-12) keeps its 1e-12, and facebook/dino-* give stock transformers' features.
      Refused for a weights file or state dict, which has no config: pass the folder or `layer_norm_eps`.
    - by default it is DINO's 1e-6 (`DINO_LAYER_NORM_EPS`), whatever the config says. This is what
      `convert_checkpoint --from vit` does, for the weights it is documented for (facebook/dino-*):
      their configs say 1e-12, transformers' ViT default, but the reference trained them with 1e-6, so
      the DinoModel computes what the reference network does and continues its training as it was.
      For another ViT (a Google one, 1e-12) pass `keep_layer_norm_eps=True`.
    `config_overrides` go to `DinoConfig` (e.g. `num_attention_heads` for a bare state dict whose width
    is not a multiple of 64, or `layer_norm_eps` to set the eps outright, without keep_layer_norm_eps).
    """
    if keep_layer_norm_eps and "layer_norm_eps" in config_overrides:
        raise ValueError(
            f"keep_layer_norm_eps=True and layer_norm_eps={config_overrides['layer_norm_eps']} both set the "
            "LayerNorm eps; pass one of them"
        )
    vit_config = None
    if isinstance(source, nn.Module):
        # transformers v5 renames the weights in memory (layers.{i}.attention.q_proj, ...); its on-disk
        # names are those of DinoModel, so read the model back from disk.
        with tempfile.TemporaryDirectory() as folder:
            source.save_pretrained(folder)
            name, vit_config, state_dict = (
                type(source).__name__,
                source.config.to_dict(),
                _folder_weights(Path(folder)),
            )
    elif isinstance(source, dict):
        name, state_dict = "ViT state dict", source
    elif Path(source).is_dir():
        name, vit_config = str(source), _read_json(Path(source) / "config.json")
        state_dict = _folder_weights(Path(source))
        if vit_config.get("model_type") != "vit":
            raise ValueError(
                f"{source}/config.json has model_type {vit_config.get('model_type')!r}, not 'vit'; "
                f"for a timm folder use dino_from_timm (--from timm)"
            )
    else:
        name, state_dict = str(source), load_checkpoint_file(source)
    fields = {}
    if vit_config is not None:
        image_size = vit_config["image_size"]
        if isinstance(image_size, (list, tuple)):
            if len(set(image_size)) != 1:
                raise ValueError(f"{name}: image size {image_size} is not square; DinoModel's native size is square")
            image_size = image_size[0]
        fields = dict(
            num_attention_heads=vit_config["num_attention_heads"],
            image_size=image_size,
            hidden_act=vit_config.get("hidden_act", "gelu"),
        )
        if keep_layer_norm_eps:
            # What ViTModel.from_pretrained reads: the config's value, else ViTConfig's default (1e-12).
            fields["layer_norm_eps"] = float(vit_config.get("layer_norm_eps", ViTConfig().layer_norm_eps))
    elif keep_layer_norm_eps:
        raise ValueError(
            f"{name} has no config.json to keep the LayerNorm eps of (keep_layer_norm_eps=True); pass the ViT "
            "folder (config.json + weights) or the model, or give the eps as layer_norm_eps=..."
        )
    fields.update(config_overrides)
    state_dict = {
        key.removeprefix("vit."): tensor
        for key, tensor in _tensors(state_dict, name).items()
        if not key.removeprefix("vit.").startswith("pooler.")
    }
    return _build_dino(state_dict, _infer_config(state_dict, name, **fields), name)


def dino_from_timm(source: "nn.Module | dict | str | Path", **config_overrides) -> DinoModel:
    """DinoModel from a timm `VisionTransformer` (num_classes=0), a timm folder (config.json +
    model.safetensors), a weights file or a state dict in timm's names. `config_overrides` go to
    `DinoConfig`.

    A model with LayerScale (timm's `init_values`, weights `blocks.{i}.ls{1,2}.gamma`) gives a DinoModel
    with `layerscale_value` = its `init_values` (1e-5, timm's default, for a weights file or state dict)
    and the vectors copied.
    """
    fields = {}
    if isinstance(source, nn.Module):
        name, state_dict = type(source).__name__, source.state_dict()
        fields = dict(num_attention_heads=source.blocks[0].attn.num_heads, image_size=source.patch_embed.img_size[0])
        if init_values := getattr(getattr(source.blocks[0], "ls1", None), "init_values", None):
            fields["layerscale_value"] = init_values
    elif isinstance(source, dict):
        name, state_dict = "timm state dict", source
    elif Path(source).is_dir():
        name, timm_config = str(source), _read_json(Path(source) / "config.json")
        if "architecture" not in timm_config:
            raise ValueError(
                f"{source}/config.json has no 'architecture': not a timm folder; for transformers use --from vit"
            )
        model_args = timm_config.get("model_args", {})
        if "num_heads" in model_args:
            fields["num_attention_heads"] = model_args["num_heads"]
        if model_args.get("init_values"):
            fields["layerscale_value"] = model_args["init_values"]
        state_dict = _folder_weights(Path(source))
    else:
        name, state_dict = str(source), load_checkpoint_file(source)
    return _dino_from_timm_names(state_dict, name, **(fields | config_overrides))


def _dino_from_timm_names(state_dict: dict, source: str, **fields) -> DinoModel:
    state_dict = _tensors(state_dict, source)
    try:
        converted = timm_to_dino_state_dict(state_dict)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
    if any(".layer_scale" in key for key in converted):
        fields.setdefault("layerscale_value", TIMM_DEFAULT_INIT_VALUES)
    return _build_dino(converted, _infer_config(converted, source, **fields), source, timm_names=True)


def dino_from_reference(
    source: "dict | str | Path", use_student: bool = False, **config_overrides
) -> ImportedCheckpoint:
    """DinoModel (and head) from a reference DINO checkpoint: a full training checkpoint (`teacher`,
    `student`, `optimizer`, `epoch`, `args`, `dino_loss`) or a backbone-only state dict.

    The teacher is taken by default (the network the paper evaluates), the student with
    `use_student=True`. The heads default to those of the checkpoint's `args.arch` when it names a
    preset of this width, else hidden_size // 64; `config_overrides` go to `DinoConfig`.
    """
    name = "reference checkpoint" if isinstance(source, dict) else str(source)
    checkpoint = source if isinstance(source, dict) else load_checkpoint_file(source)
    which = "student" if use_student else "teacher"
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{name} holds a {type(checkpoint).__name__}, not a checkpoint dict or a state dict")
    args = checkpoint.get("args")
    if "teacher" in checkpoint or "student" in checkpoint:
        if not isinstance(checkpoint.get(which), dict):
            raise ValueError(f"{name} has no {which!r} state dict (its entries: {sorted(checkpoint)})")
        weights, name = checkpoint[which], f"{name}[{which!r}]"
    elif use_student:
        raise ValueError(
            f"{name} is a backbone-only state dict with one network; use_student needs a training checkpoint"
        )
    else:
        weights = checkpoint
    backbone, head = {}, {}
    for key, tensor in _tensors(weights, name).items():
        key = key.removeprefix("module.")
        if key.startswith("head."):
            head[key.removeprefix("head.")] = tensor
        else:
            backbone[key.removeprefix("backbone.")] = tensor
    fields = {}
    preset = f"{getattr(args, 'arch', None)}_patch{getattr(args, 'patch_size', None)}"
    if preset in PRESETS and "cls_token" in backbone:
        preset = DinoConfig.from_preset(preset)
        if preset.hidden_size == backbone["cls_token"].shape[-1]:
            fields["num_attention_heads"] = preset.num_attention_heads
    model = _dino_from_timm_names(backbone, name, **(fields | config_overrides))
    if not head:
        return ImportedCheckpoint(model)
    # The teacher's head is always built with norm_last_layer=True (docs/recipe.md#student-and-teacher).
    norm_last_layer = bool(getattr(args, "norm_last_layer", True)) if use_student else True
    return ImportedCheckpoint(model, head, _head_config(head, norm_last_layer, name))


def dino_from_dinov2_with_registers(source: "Dinov2WithRegistersModel | str | Path", **config_overrides) -> DinoModel:
    """DinoModel from a transformers `Dinov2WithRegistersModel` (or a model built on one, such as
    `Dinov2WithRegistersForImageClassification`, whose head is left out), or from its folder or Hub id,
    every weight of which is checked as it loads (`weight_check.load_checked`).

    The MLP must be DINO's GELU MLP (not SwiGLU). LayerScale: when every LayerScale vector is exactly 1
    (an untrained Dinov2, or one written by `dino_to_dinov2_with_registers` from a DinoModel without
    LayerScale), it changes nothing and the DinoModel has none, as DINO's ViT; otherwise (the released
    DINOv2 checkpoints learn theirs) the DinoModel gets `layerscale_value` = the Dinov2 config's and the
    vectors are copied. `layerscale_value=...` decides otherwise (a float keeps even all-ones vectors;
    None is refused for vectors that are not all ones). The register tokens are copied; the mask token
    is kept (`use_mask_token=True`) when it is not all zeros, i.e. when it was trained; pass
    `use_mask_token=True` / `False` to keep or drop it whatever its values. `config_overrides` go to
    `DinoConfig` (stochastic depth is DinoConfig's default, 0.1 growing over the blocks, unless given).

    Raises:
        ValueError: not a Dinov2WithRegisters model or folder, SwiGLU, LayerScale other than 1 with
            `layerscale_value=None`, a non-square image or patch size, or a folder that does not fill
            the model.
    """
    if isinstance(source, (str, Path)):
        config = AutoConfig.from_pretrained(str(source))
        if config.model_type != "dinov2_with_registers":
            raise ValueError(
                f"{source}: model_type {config.model_type!r}, not 'dinov2_with_registers'; for a transformers "
                f"ViT folder use dino_from_vit (--from vit)"
            )
        name = str(source)
        source = load_checked(Dinov2WithRegistersModel, name, dropped_prefixes=("classifier.",))
    elif not isinstance(source, PreTrainedModel) or source.config.model_type != "dinov2_with_registers":
        raise ValueError(f"expected a Dinov2WithRegistersModel, its folder or Hub id; got a {type(source).__name__}")
    else:
        name = type(source).__name__
    model = source.base_model
    config = _dinov2_fields(model, name)
    config["layerscale_value"] = _dinov2_layerscale(model, name, config_overrides)
    keep_layer_scale = config["layerscale_value"] is not None
    state = {
        _dino_key_from_dinov2(key): tensor
        for key, tensor in model.state_dict().items()
        if keep_layer_scale or not key.endswith(".lambda1")
    }
    mask_token = state.pop("embeddings.mask_token").reshape(1, 1, -1)  # (1, D) -> (1, 1, D)
    if not config["num_register_tokens"]:
        del state["embeddings.register_tokens"]  # (1, 0, D): DinoModel holds no empty weight
    config["use_mask_token"] = config_overrides.pop("use_mask_token", bool(mask_token.count_nonzero()))
    if config["use_mask_token"]:
        state["embeddings.mask_token"] = mask_token
    return _build_dino(state, DinoConfig(**(config | config_overrides)), name)


def _dinov2_fields(model: nn.Module, source: str) -> dict:
    """DinoConfig fields of a Dinov2WithRegistersModel, after checking that DinoModel can hold its network."""
    config = model.config
    if config.use_swiglu_ffn:
        raise ValueError(
            f"{source} has a SwiGLU MLP (use_swiglu_ffn=True, as DINOv2's ViT-g); DinoModel's MLP is one GELU "
            f"layer, so it cannot be converted: train it as a transformers backbone (--model_name_or_path FOLDER)"
        )
    sizes = {}
    for field in ("image_size", "patch_size"):
        value = getattr(config, field)
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"{source}: {field} {value} is not square; DinoModel's is square")
            value = value[0]
        sizes[field] = int(value)
    return dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=int(config.hidden_size * config.mlp_ratio),
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        num_register_tokens=config.num_register_tokens,
        **sizes,
    )


def _dinov2_layerscale(model: nn.Module, source: str, config_overrides: dict) -> float | None:
    """DinoConfig's `layerscale_value` for a Dinov2WithRegistersModel: None when every LayerScale is
    exactly 1, else the Dinov2 config's `layerscale_value`; a `layerscale_value` in `config_overrides`
    (taken out of it) wins, but None is refused where a LayerScale is not all ones."""
    not_ones = [
        (key, tensor)
        for key, tensor in model.state_dict().items()
        if key.endswith(".lambda1") and not torch.equal(tensor, torch.ones_like(tensor))
    ]
    value = config_overrides.pop("layerscale_value", model.config.layerscale_value if not_ones else None)
    if value is None and not_ones:
        key, tensor = not_ones[0]
        raise ValueError(
            f"{source}: LayerScale {key} is not all ones (values {tensor.min().item():.3g} to "
            f"{tensor.max().item():.3g}), so a DinoModel without LayerScale (layerscale_value=None) would "
            f"compute something else; leave layerscale_value out to keep the LayerScale"
        )
    return value


def _dino_key_from_dinov2(key: str) -> str:
    return dinov2_block_key(key, {dinov2: dino for dino, dinov2 in DINOV2_BLOCK_NAMES.items()}) or key


def _head_config(head: dict[str, torch.Tensor], norm_last_layer: bool, source: str) -> dict:
    """`DinoHead` keyword arguments read off the head's shapes; checked by loading the weights."""
    linears = sorted(
        (key for key in head if re.fullmatch(r"mlp(\.\d+)?\.weight", key) and head[key].ndim == 2),
        key=lambda key: int(key.split(".")[1]) if key.count(".") == 2 else 0,
    )
    if not linears or "last_layer.weight_v" not in head:
        raise ValueError(f"{source}: the head lacks 'mlp.0.weight' / 'last_layer.weight_v'; is it a DINOHead?")
    first, last = head[linears[0]], head[linears[-1]]
    config = dict(
        in_dim=first.shape[1],
        out_dim=head["last_layer.weight_v"].shape[0],
        use_bn=any(key.endswith("running_mean") for key in head),
        norm_last_layer=norm_last_layer,
        nlayers=len(linears),
        hidden_dim=first.shape[0] if len(linears) > 1 else 2048,
        bottleneck_dim=last.shape[0],
    )
    try:
        DinoHead(**config).load_state_dict(head, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source}: the head does not match DinoHead({config}): {error}") from error
    return config


# ---------------------------------------------------------------------------------------------------
# One call per command line


def load_dino_folder(folder: str | Path) -> ImportedCheckpoint:
    """A folder written by `DinoModel.save_pretrained` (or `convert_checkpoint(..., "dino", ...)`), with
    the head when `dino_head.safetensors` and `dino_head_config.json` are there."""
    folder = Path(folder)
    model = DinoModel.from_pretrained(folder).eval()
    if not (folder / HEAD_WEIGHTS_NAME).is_file():
        return ImportedCheckpoint(model)
    return ImportedCheckpoint(model, load_file(folder / HEAD_WEIGHTS_NAME), _read_json(folder / HEAD_CONFIG_NAME))


def convert_checkpoint(
    source_format: str,
    source: str | Path,
    target_format: str,
    target: str | Path,
    use_student: bool = False,
    **config_overrides,
) -> ImportedCheckpoint:
    """Read `source` in `source_format` and write it to the folder `target` in `target_format`.

    Source formats: "vit" (transformers ViT folder or weights file), "timm" (timm folder or weights
    file), "dino" (a reference checkpoint .pth, or a dino_hf folder). Target formats: "dino" (a
    DinoModel folder, with the head as `dino_head.safetensors` + `dino_head_config.json`), "vit",
    "timm" (backbone only; a model with register tokens is refused there, one with LayerScale is
    refused by "vit" and kept by "timm", and the mask token is left out, `export.as_plain_vit`).
    Returns what was read.
    """
    if source_format not in ("vit", "timm", "dino"):
        raise ValueError(f"unknown source format {source_format!r}; use 'vit', 'timm' or 'dino'")
    if target_format not in ("dino", "vit", "timm"):
        raise ValueError(f"unknown target format {target_format!r}; use 'dino', 'vit' or 'timm'")
    if source_format == "vit":
        imported = ImportedCheckpoint(dino_from_vit(source, **config_overrides))
    elif source_format == "timm":
        imported = ImportedCheckpoint(dino_from_timm(source, **config_overrides))
    elif source_format == "dino" and Path(source).is_dir():
        imported = load_dino_folder(source)
    else:
        imported = dino_from_reference(source, use_student=use_student, **config_overrides)
    if target_format == "dino":
        imported.model.save_pretrained(target)
        if imported.head_state_dict is not None:
            head = {key: tensor.contiguous() for key, tensor in imported.head_state_dict.items()}
            save_file(head, Path(target) / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})
            (Path(target) / HEAD_CONFIG_NAME).write_text(json.dumps(imported.head_config, indent=2) + "\n")
    elif target_format == "vit":
        save_as_vit(as_plain_vit(imported.model, "vit"), target)
    else:
        save_as_timm(as_plain_vit(imported.model, "timm"), target)
    return imported


__all__ = [
    "ImportedCheckpoint",
    "convert_checkpoint",
    "dino_from_dinov2_with_registers",
    "dino_from_reference",
    "dino_from_timm",
    "dino_from_vit",
    "load_dino_folder",
]
