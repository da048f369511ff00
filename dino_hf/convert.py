"""Conversions between `DinoModel` and the formats DINO weights come in (the outputs are the same numbers).

Import into `DinoModel`:
- transformers `ViTModel` checkpoints (facebook/dino-vits16, -vits8, -vitb16, -vitb8): the same weight
  names as `DinoModel`, plus a `pooler.*` layer that DINO does not have (dropped);
- timm `VisionTransformer` weights (the `*.dino` tags): `cls_token`, `pos_embed`, `patch_embed.proj`,
  `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, with q, k, v fused;
- the reference DINO checkpoints (SPEC "Checkpoint format of the reference"): full training checkpoints
  with `teacher` / `student` (keys `[module.]backbone.*` with timm's names, `[module.]head.*`), and
  backbone-only state dicts.

Export from `DinoModel`: a stock transformers `ViTModel` folder that loads with `AutoModel` alone, and a
timm folder that loads with `timm.create_model("local-dir:PATH", pretrained=True)` and with transformers'
`TimmWrapperModel`. All three agree at the native image size; at other sizes each library interpolates
the position embeddings its own way (SPEC "Networks").

Weights are read with safetensors, or with `torch.load(weights_only=True)` for .pth / .bin files: no
code is ever unpickled (the reference's `args`, an `argparse.Namespace`, is the one class allowed).
"""

import argparse
import json
import math
import pickle
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTConfig, ViTModel

from .configuration_dino import PRESETS, DinoConfig
from .heads import DinoHead
from .modeling_dino import IMAGENET_MEAN, IMAGENET_STD, DinoModel, dino_image_processor

# LayerNorm eps the DINO weights were trained with (SPEC "Networks"), whatever a copied config says.
DINO_LAYER_NORM_EPS = 1e-6
HEAD_WEIGHTS_NAME = "dino_head.safetensors"
HEAD_CONFIG_NAME = "dino_head_config.json"

# timm / reference module name -> DinoModel module name (transformers' ViT names).
_TIMM_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
_TIMM_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")  # order of the fused timm `attn.qkv` along dim 0


class ImportedCheckpoint(NamedTuple):
    """A converted backbone, and the DINO projection head when the source had one.

    `head_state_dict` has the reference's names (`mlp.{i}.weight`, `last_layer.weight_g`, ...) and loads
    into `DinoHead(**head_config)`.
    """

    model: DinoModel
    head_state_dict: dict[str, torch.Tensor] | None = None
    head_config: dict | None = None


# ---------------------------------------------------------------------------------------------------
# Reading files


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a .safetensors file, or a .pth / .bin file with `torch.load(weights_only=True)` on the CPU.

    Tensors, numbers, strings and containers load, and so does the `argparse.Namespace` the reference
    stores as `args`. Anything else (code, arbitrary classes) is refused with a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line for line in str(error).splitlines() if "GLOBAL" in line] or [str(error).strip().splitlines()[-1]]
        reason = lines[0].strip()
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, which dino_hf does not "
            f"unpickle ({reason}). If you trust the file, open it yourself with weights_only=False and "
            "save only its state dicts (e.g. its 'teacher' entry) with torch.save or safetensors"
        ) from error


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
# timm / reference names <-> DinoModel names


def _timm_key_to_dino(key: str) -> str | None:
    """DinoModel name of one timm key other than `attn.qkv`, or None when it has no counterpart."""
    if key in ("cls_token", "pos_embed"):
        return _TIMM_TOP[key]
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _TIMM_TOP:
        return f"{_TIMM_TOP[module]}.{param}"
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if block and block.group(2) in _TIMM_BLOCK:
        return f"encoder.layer.{block.group(1)}.{_TIMM_BLOCK[block.group(2)]}.{param}"
    return None


def _dino_key_to_timm(key: str) -> str:
    """timm name of one DinoModel key (query, key and value all map to the fused `attn.qkv`)."""
    for timm_name, dino_name in _TIMM_TOP.items():
        if key == dino_name or key.startswith(dino_name + "."):
            return timm_name + key[len(dino_name) :]
    layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
    block_names = {dino_name: timm_name for timm_name, dino_name in _TIMM_BLOCK.items()}
    if layer and layer.group(2) in [f"attention.attention.{part}" for part in _QKV]:
        return f"blocks.{layer.group(1)}.attn.qkv.{layer.group(3)}"
    if layer and layer.group(2) in block_names:
        return f"blocks.{layer.group(1)}.{block_names[layer.group(2)]}.{layer.group(3)}"
    raise ValueError(f"{key!r} is not a weight of DinoModel; cannot name it in timm's format")


def timm_to_dino_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm / reference ViT state dict to DinoModel's names, splitting each fused
    `blocks.{i}.attn.qkv` `(3D, D)` into query, key, value `(D, D)` (in that order along dim 0)."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        qkv = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if qkv:
            if tensor.shape[0] % 3:
                raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}: dim 0 must stack q, k, v (a multiple of 3)")
            for part, chunk in zip(_QKV, tensor.chunk(3, dim=0)):  # (D, D) or (D,) each
                converted[f"encoder.layer.{qkv.group(1)}.attention.attention.{part}.{qkv.group(2)}"] = chunk.clone()
        elif (name := _timm_key_to_dino(key)) is not None:
            converted[name] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown keys {unknown[:6]}{' ...' if len(unknown) > 6 else ''}: not part of a DINO ViT backbone "
            f"(a classifier `head.*`, register tokens, layer scale?); remove them, or build the timm model with "
            f"num_classes=0 and no extra tokens"
        )
    return converted


def dino_to_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a DinoModel state dict to timm's (and the reference's) names, fusing query, key and value
    into `blocks.{i}.attn.qkv` `(3D, D)`."""
    converted = {}
    for key, tensor in state_dict.items():
        if ".attention.attention." in key:
            if ".attention.attention.query." not in key:
                continue  # key and value join query below
            parts = [state_dict[key.replace(".query.", f".{part}.")] for part in _QKV]
            converted[_dino_key_to_timm(key)] = torch.cat(parts, dim=0)  # (3D, D) or (3D,)
        else:
            converted[_dino_key_to_timm(key)] = tensor
    return converted


# ---------------------------------------------------------------------------------------------------
# Building a DinoModel from DinoModel-named weights


def _infer_config(state_dict: dict[str, torch.Tensor], source: str, **fields) -> DinoConfig:
    """DinoConfig from the tensor shapes; `fields` (heads, image size, drop_path_rate, ...) override.

    Heads default to hidden_size // 64, as in all of DINO's ViTs. LayerNorm eps is 1e-6.
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
        return f"{_dino_key_to_timm(key)!r} (DinoModel {key!r})" if timm_names else repr(key)

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


def dino_from_vit(source: "ViTModel | dict | str | Path", **config_overrides) -> DinoModel:
    """DinoModel from a transformers `ViTModel`, its folder (config.json + weights), a weights file or a
    state dict (keys as `ViTModel`, or prefixed `vit.` as in `ViTForImageClassification`; `pooler.*` is
    dropped).

    LayerNorm eps is set to 1e-6: the facebook/dino-* configs say 1e-12, but the weights were trained
    with 1e-6 (SPEC "Checkpoint format of the reference"). `config_overrides` go to `DinoConfig`
    (e.g. `num_attention_heads` for a bare state dict whose width is not a multiple of 64).
    """
    vit_config = None
    if isinstance(source, nn.Module):
        # transformers v5 renames the weights in memory (layers.{i}.attention.q_proj, ...); its on-disk
        # names are those of DinoModel, so read the model back from disk.
        with tempfile.TemporaryDirectory() as folder:
            source.save_pretrained(folder)
            name, vit_config, state_dict = type(source).__name__, source.config.to_dict(), _folder_weights(Path(folder))
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
    `DinoConfig`."""
    fields = {}
    if isinstance(source, nn.Module):
        name, state_dict = type(source).__name__, source.state_dict()
        fields = dict(num_attention_heads=source.blocks[0].attn.num_heads, image_size=source.patch_embed.img_size[0])
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
        state_dict = _folder_weights(Path(source))
    else:
        name, state_dict = str(source), load_checkpoint_file(source)
    return _dino_from_timm_names(state_dict, name, **(fields | config_overrides))


def _dino_from_timm_names(state_dict: dict, source: str, **fields) -> DinoModel:
    try:
        converted = timm_to_dino_state_dict(_tensors(state_dict, source))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error
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
    # The teacher's head is always built with norm_last_layer=True (SPEC "Networks").
    norm_last_layer = bool(getattr(args, "norm_last_layer", True)) if use_student else True
    return ImportedCheckpoint(model, head, _head_config(head, norm_last_layer, name))


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
# Export


def save_as_vit(model: DinoModel, save_directory: str | Path) -> None:
    """Write a transformers ViT folder that `AutoModel` loads without dino_hf: config.json (model_type
    "vit"), model.safetensors in the on-disk names of facebook/dino-* and preprocessor_config.json
    (DINO's evaluation transform).

    The pooler is an identity Linear with a "linear" activation, so `pooler_output` is the DINO feature
    (the CLS token after the final norm). At other image sizes `ViTModel` needs
    `interpolate_pos_encoding=True`, which interpolates slightly differently from DINO.
    """
    config = model.config
    ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        pooler_act="linear",
        architectures=["ViTModel"],
    ).save_pretrained(save_directory)
    tensors = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    tensors["pooler.dense.weight"] = torch.eye(config.hidden_size)  # (D, D): the pooler passes the CLS token through
    tensors["pooler.dense.bias"] = torch.zeros(config.hidden_size)
    save_file(tensors, Path(save_directory) / "model.safetensors", metadata={"format": "pt"})
    dino_image_processor(config.image_size).save_pretrained(save_directory)


def to_vit_model(model: DinoModel) -> ViTModel:
    """A stock transformers `ViTModel` with the same weights, loaded from a `save_as_vit` folder."""
    with tempfile.TemporaryDirectory() as folder:
        save_as_vit(model, folder)
        return ViTModel.from_pretrained(folder).eval()


def timm_model_args(config: DinoConfig) -> dict:
    """Keyword arguments of timm's `VisionTransformer` for the same network (num_classes aside)."""
    if config.layer_norm_eps != DINO_LAYER_NORM_EPS or config.hidden_act != "gelu":
        raise ValueError(
            f"timm's ViT has LayerNorm eps 1e-6 and GELU; this model has eps {config.layer_norm_eps} and "
            f"{config.hidden_act!r}: export it with save_as_vit instead"
        )
    mlp_ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != config.intermediate_size:
        raise ValueError(f"intermediate size {config.intermediate_size} is not expressible as a timm mlp_ratio")
    return dict(
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        img_size=config.image_size,
        in_chans=config.num_channels,
        mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias,
        global_pool="token",
        dynamic_img_size=True,
    )


def _timm_architecture(config: DinoConfig) -> str:
    """timm's name for the preset this model matches; model_args carry the exact sizes either way."""
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    for preset in PRESETS:
        reference = DinoConfig.from_preset(preset)
        if all(getattr(reference, f) == getattr(config, f) for f in sizes) and timm.is_model(f"{preset}_224"):
            return f"{preset}_224"
    return "vit_base_patch16_224"


def to_timm_model(model: DinoModel) -> nn.Module:
    """A timm `VisionTransformer` (num_classes=0, dynamic image size) with the same weights."""
    timm_model = timm.create_model(
        _timm_architecture(model.config), pretrained=False, num_classes=0, **timm_model_args(model.config)
    )
    timm_model.load_state_dict(dino_to_timm_state_dict(model.state_dict()), strict=True)
    return timm_model.eval()


def save_as_timm(model: DinoModel, save_directory: str | Path) -> None:
    """Write a timm folder: model.safetensors in timm's names and a config.json with `architecture`,
    `model_args` and `pretrained_cfg` (DINO's evaluation transform: bicubic, crop 224/256, ImageNet
    mean and std).

    Unlike timm's `save_for_hf`, `model_args` leaves out `num_classes` (kept at the top level and in
    `pretrained_cfg`): transformers' `TimmWrapperModel` passes num_classes=0 itself and fails on a
    duplicate. The folder loads with `timm.create_model("local-dir:PATH", pretrained=True)` and with
    `TimmWrapperModel.from_pretrained(PATH)`.
    """
    config = model.config
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.contiguous() for key, tensor in dino_to_timm_state_dict(model.state_dict()).items()}
    save_file(tensors, save_directory / "model.safetensors", metadata={"format": "pt"})
    timm_config = {
        "architecture": _timm_architecture(config),
        "num_classes": 0,
        "num_features": config.hidden_size,
        "global_pool": "token",
        "model_args": timm_model_args(config),
        "pretrained_cfg": {
            "tag": "dino",
            "custom_load": False,
            "input_size": [config.num_channels, config.image_size, config.image_size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 224 / 256,
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (save_directory / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")


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
    "timm" (backbone only). Returns what was read.
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
        save_as_vit(imported.model, target)
    else:
        save_as_timm(imported.model, target)
    return imported


__all__ = [
    "ImportedCheckpoint",
    "convert_checkpoint",
    "dino_from_reference",
    "dino_from_timm",
    "dino_from_vit",
    "dino_to_timm_state_dict",
    "load_checkpoint_file",
    "load_dino_folder",
    "save_as_timm",
    "save_as_vit",
    "timm_model_args",
    "timm_to_dino_state_dict",
    "to_timm_model",
    "to_vit_model",
]
