"""Where each parameter of a backbone sits: its layer and its freezing unit, by family.

The layout is counted as DINOv2 counts it (`get_vit_lr_decay_rate` in its `dinov2/train/param_groups.py`;
DINOv3 the same): the patch embedding and the tokens beside it (CLS, position, register, mask tokens) are
layer 0, block b (0-based; for ConvNeXt and Swin counted on over the stages, a stage's downsampling layer
going with the stage it starts) is layer b + 1, and what follows the last block (the final norm) is layer
L + 1. Layer-wise lr decay and block freezing (`dino_hf.training.layer_decay`) and LoRA's choice of blocks
(`dino_hf.models.lora`) read it.

The layout comes from name patterns per family for `DinoModel` and the transformers models, and from
the model's own `group_matcher` for timm models (what `timm.optim.param_groups_layer_decay` uses).
"""

import re
from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from .configuration_dino import DinoConfig

# timm's marker for "this parameter joins the group before it" (timm.models._manipulate).
_TIMM_MATCH_PREV_GROUP = (99999,)


@dataclass(frozen=True)
class Place:
    """Where one parameter sits: its `layer` (0 to L + 1), its freezing `unit` (0: the embeddings,
    1 to U: the blocks or stages, U + 1: after them) and whether it is the patch embedding."""

    layer: int
    unit: int
    patch_embed: bool = False


@dataclass(frozen=True)
class BackboneLayout:
    """The places of every parameter of a backbone's model, by its own parameter names.

    `num_layers` is L, the blocks (over all stages); `num_units` is U, what `--freeze_blocks` counts:
    blocks for a ViT, stages for a hierarchical model (`unit_name`).
    """

    family: str
    num_layers: int
    num_units: int
    unit_name: str
    places: dict[str, Place]

    def lr_scale(self, name: str, layer_decay: float, patch_embed_lr_mult: float) -> float:
        """lr multiplier of parameter `name`: layer_decay^(L + 1 - layer), x patch_embed_lr_mult for
        the patch embedding."""
        place = self.places[name]
        scale = layer_decay ** (self.num_layers + 1 - place.layer)
        return scale * patch_embed_lr_mult if place.patch_embed else scale


@dataclass(frozen=True)
class _Rules:
    """Parameter-name patterns of one family, each matched at the start of a name, tried in this order.

    `blocks` captures (block,) for a ViT, (stage, block) for a hierarchical model, whose `downsample`
    captures (stage,): the downsampling layer starts that stage, or the next one where
    `downsample_starts_next` (Swin's `layers.j.downsample` runs after stage j's blocks). `depths`
    names the config field of the blocks per stage (a list), or of the block count of a ViT.
    """

    patch_embed: str
    embeddings: str | None
    blocks: str
    final: str
    depths: str = "num_hidden_layers"
    downsample: str | None = None
    downsample_starts_next: bool = False


_VIT_EMBEDDINGS = dict(patch_embed=r"embeddings\.patch_embeddings\.", embeddings=r"embeddings\.")
_CONVNEXT = _Rules(
    patch_embed=r"embeddings\.",
    embeddings=None,
    blocks=r"encoder\.stages\.(\d+)\.layers\.(\d+)\.",
    final=r"layernorm\.",
    depths="depths",
    downsample=r"encoder\.stages\.(\d+)\.downsampling_layer\.",
)

# By `config.model_type`. Read from the installed transformers' modeling files (`named_parameters()`
# of tiny instances); a parameter that matches none of its family's patterns is an error, not a guess.
RULES = {
    DinoConfig.model_type: _Rules(**_VIT_EMBEDDINGS, blocks=r"encoder\.layer\.(\d+)\.", final=r"layernorm\."),
    "vit": _Rules(**_VIT_EMBEDDINGS, blocks=r"layers\.(\d+)\.", final=r"(layernorm|pooler)\."),
    "deit": _Rules(**_VIT_EMBEDDINGS, blocks=r"layers\.(\d+)\.", final=r"(layernorm|pooler)\."),
    "dinov2": _Rules(**_VIT_EMBEDDINGS, blocks=r"encoder\.layer\.(\d+)\.", final=r"layernorm\."),
    "dinov2_with_registers": _Rules(**_VIT_EMBEDDINGS, blocks=r"encoder\.layer\.(\d+)\.", final=r"layernorm\."),
    "dinov3_vit": _Rules(**_VIT_EMBEDDINGS, blocks=r"model\.layer\.(\d+)\.", final=r"norm\."),
    "convnext": _CONVNEXT,
    "convnextv2": _CONVNEXT,
    # DINOv3's ConvNeXt keeps its stem as stage 0's downsampling layers.
    "dinov3_convnext": _Rules(
        patch_embed=r"model\.stages\.0\.downsample_layers\.",
        embeddings=None,
        blocks=r"model\.stages\.(\d+)\.layers\.(\d+)\.",
        final=r"layer_norm\.",
        depths="depths",
        downsample=r"model\.stages\.(\d+)\.downsample_layers\.",
    ),
    "swin": _Rules(
        patch_embed=r"embeddings\.(patch_embeddings|norm)\.",
        embeddings=r"embeddings\.",
        blocks=r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.",
        final=r"layernorm\.",
        depths="depths",
        downsample=r"encoder\.layers\.(\d+)\.downsample\.",
        downsample_starts_next=True,
    ),
}


def _supported_families() -> str:
    transformers_types = ", ".join(sorted(name for name in RULES if name != DinoConfig.model_type))
    return f"DinoModel, timm models with a group_matcher, and the transformers model types {transformers_types}"


def backbone_layout(model: nn.Module) -> BackboneLayout:
    """The layout of `model` (a backbone's `.model`: a DinoModel, a transformers or a timm model).

    Raises:
        ValueError: a model of another family, or one whose parameter names the family's patterns do
            not cover.
    """
    if type(model).__module__.startswith("timm.") and hasattr(model, "group_matcher"):
        return _timm_layout(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in RULES:
        return _rules_layout(model, model_type, RULES[model_type])
    raise ValueError(
        f"--layer_decay, --patch_embed_lr_mult and --freeze_blocks need to know where each block of the backbone "
        f"sits, and {type(model).__name__} (model type {model_type}) is not a family they know; supported: "
        f"{_supported_families()}. Leave them at 1.0, 1.0 and 0 for this backbone"
    )


def _rules_layout(model: nn.Module, family: str, rules: _Rules) -> BackboneLayout:
    depths = getattr(model.config, rules.depths)
    hierarchical = rules.downsample is not None
    depths = list(depths) if hierarchical else [int(depths)]
    starts = [1 + sum(depths[:stage]) for stage in range(len(depths))]  # layer of each stage's first block
    num_layers, num_units = sum(depths), len(depths) if hierarchical else sum(depths)
    after = Place(num_layers + 1, num_units + 1)

    def place(name: str) -> Place:
        if re.match(rules.patch_embed, name):
            return Place(0, 0, patch_embed=True)
        if rules.embeddings is not None and re.match(rules.embeddings, name):
            return Place(0, 0)
        if match := re.match(rules.blocks, name):
            *stage, block = (int(group) for group in match.groups())
            stage = stage[0] if stage else 0
            return Place(starts[stage] + block, stage + 1 if hierarchical else block + 1)
        if rules.downsample is not None and (match := re.match(rules.downsample, name)):
            stage = int(match.group(1)) + rules.downsample_starts_next
            return Place(starts[stage], stage + 1)
        if re.match(rules.final, name):
            return after
        raise ValueError(
            f"parameter {name!r} of the {family} model is in none of the places dino_hf knows for that family "
            "(embeddings, blocks, final norm); this transformers version names its parameters otherwise"
        )

    places = {name: place(name) for name, _ in model.named_parameters()}
    return BackboneLayout(family, num_layers, num_units, "stages" if hierarchical else "blocks", places)


def _timm_layout(model: nn.Module) -> BackboneLayout:
    """Layers from timm's fine `group_matcher` (stem 0, then each block), freezing units from its coarse
    one (each block of a ViT, each stage of a CNN or Swin). timm merges a ViT's final norm into the last
    block's group; here, as in DINOv2, it is a layer of its own after the blocks, as are the parameters
    that no pattern matches (a ConvNeXt's head norm). The patch embedding is `patch_embed.*` where the
    model has one, else the whole stem (a CNN's first conv and norm)."""
    fine, coarse = model.group_matcher(coarse=False), model.group_matcher(coarse=True)
    if not isinstance(fine, dict) or not isinstance(coarse, dict):
        raise ValueError(f"timm's {type(model).__name__} has no group_matcher patterns to count its blocks by")
    names = [name for name, _ in model.named_parameters()]
    after_blocks = _timm_after_blocks(fine)
    inside = [name for name in names if not after_blocks(name)]
    layers, units = group_parameters(model, fine, reverse=True), group_parameters(model, coarse, reverse=True)
    num_layers, num_units = max(layers[name] for name in inside), max(units[name] for name in inside)
    stem = "patch_embed." if hasattr(model, "patch_embed") else ""
    places = {
        name: (
            Place(num_layers + 1, num_units + 1)
            if after_blocks(name)
            else Place(layers[name], units[name], patch_embed=layers[name] == 0 and name.startswith(stem))
        )
        for name in names
    }
    unit_name = "blocks" if coarse == fine else "stages"  # a ViT's coarse groups are its blocks
    return BackboneLayout(f"timm {type(model).__name__}", num_layers, num_units, unit_name, places)


def _timm_after_blocks(matcher: dict):
    """Whether timm's `matcher` puts a parameter after the blocks: its first matching pattern (timm's
    `group_with_matcher` tries them in this order) joins the previous group, or none matches."""
    patterns = []
    for spec in matcher.values():
        if spec is None:
            continue
        for regex, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            patterns.append((re.compile(regex), suffix is not None and tuple(suffix) == _TIMM_MATCH_PREV_GROUP))
    return lambda name: next((merged for regex, merged in patterns if regex.match(name)), True)


__all__ = ["RULES", "BackboneLayout", "Place", "backbone_layout"]
