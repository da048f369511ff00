"""Weights of timm's `VisionTransformer` (and of the reference DINO, which uses timm's names) in
`DinoModel`'s names, and back.

timm names the modules `cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}` and `norm` (with LayerScale,
`init_values`, also `blocks.{i}.ls{1,2}.gamma`), and fuses query, key and value into one `attn.qkv` of
shape `(3D, D)`; `DinoModel` uses transformers' ViT names (and Dinov2's `layer_scale{1,2}.lambda1`) with
q, k, v apart. The networks are otherwise the same, so a conversion is a rename (and a split or a
concatenation of q, k, v). DINO's weights were trained with LayerNorm eps 1e-6, timm's default.
"""

import re

import torch

# LayerNorm eps the DINO weights were trained with (docs/formats.md#layernorm-epsilon), whatever a copied config says.
DINO_LAYER_NORM_EPS = 1e-6

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
_TIMM_LAYER_SCALE = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
_DINO_LAYER_SCALE = {dino_name: timm_name for timm_name, dino_name in _TIMM_LAYER_SCALE.items()}
_QKV = ("query", "key", "value")  # order of the fused timm `attn.qkv` along dim 0


def _timm_key_to_dino(key: str) -> str | None:
    """DinoModel name of one timm key other than `attn.qkv`, or None when it has no counterpart."""
    if key in ("cls_token", "pos_embed"):
        return _TIMM_TOP[key]
    if layer_scale := re.fullmatch(r"blocks\.(\d+)\.(ls[12]\.gamma)", key):
        return f"encoder.layer.{layer_scale.group(1)}.{_TIMM_LAYER_SCALE[layer_scale.group(2)]}"
    module, _, param = key.rpartition(".")
    if param not in ("weight", "bias"):
        return None
    if module in _TIMM_TOP:
        return f"{_TIMM_TOP[module]}.{param}"
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if block and block.group(2) in _TIMM_BLOCK:
        return f"encoder.layer.{block.group(1)}.{_TIMM_BLOCK[block.group(2)]}.{param}"
    return None


def dino_key_to_timm(key: str) -> str:
    """timm name of one DinoModel key (query, key and value all map to the fused `attn.qkv`)."""
    for timm_name, dino_name in _TIMM_TOP.items():
        if key == dino_name or key.startswith(dino_name + "."):
            return timm_name + key[len(dino_name) :]
    if layer_scale := re.fullmatch(r"encoder\.layer\.(\d+)\.(layer_scale[12]\.lambda1)", key):
        return f"blocks.{layer_scale.group(1)}.{_DINO_LAYER_SCALE[layer_scale.group(2)]}"
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
                raise ValueError(
                    f"{key!r} has shape {tuple(tensor.shape)}: dim 0 must stack q, k, v (a multiple of 3)"
                )
            for part, chunk in zip(_QKV, tensor.chunk(3, dim=0)):  # (D, D) or (D,) each
                converted[f"encoder.layer.{qkv.group(1)}.attention.attention.{part}.{qkv.group(2)}"] = chunk.clone()
        elif (name := _timm_key_to_dino(key)) is not None:
            converted[name] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown keys {unknown[:6]}{' ...' if len(unknown) > 6 else ''}: not part of a DINO ViT backbone "
            f"(a classifier `head.*`, register tokens?); remove them, or build the timm model with "
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
            converted[dino_key_to_timm(key)] = torch.cat(parts, dim=0)  # (3D, D) or (3D,)
        else:
            converted[dino_key_to_timm(key)] = tensor
    return converted


__all__ = ["DINO_LAYER_NORM_EPS", "dino_key_to_timm", "dino_to_timm_state_dict", "timm_to_dino_state_dict"]
