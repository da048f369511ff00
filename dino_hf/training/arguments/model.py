"""The model settings of a run: the backbone to train and its DINO head, and their checks."""

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import timm

from ...models.configuration_dino import PRESETS, DinoConfig
from ...models.references import TIMM_PREFIX, is_external_timm_name, is_hub_id, missing_local_path
from ...models.transformers_backbone import FAMILIES, accepted_models_text, check_vision_config
from ...run_files.checkpoints import checkpoint_holding, is_checkpoint
from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class ModelArguments:
    """The backbone and the DINO head."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "DinoModel preset (e.g. vit_small_patch16), a saved DinoModel / ViT folder, a Hub id, "
            "a reference DINO .pth checkpoint, or trained timm weights: timm:NAME (e.g. "
            "timm:vit_small_patch16_224.dino) or a folder saved by timm. Mutually exclusive with --backbone."
        },
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "A timm backbone as timm:NAME (e.g. timm:resnet50, timm:vit_small_patch16_224)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Fields of a DinoModel preset's DinoConfig to change when training it from scratch, as "
            "transformers' example scripts take them: comma-separated key=value, e.g. "
            "num_hidden_layers=6,intermediate_size=768. Only with a preset --model_name_or_path."
        },
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the student (reference 0.1)."})
    out_dim: int = field(default=65536, metadata={"help": "Number of prototypes K of the DINO head."})
    norm_last_layer: bool = field(
        default=True, metadata={"help": "Freeze the norm of the head's last layer at 1 (False in the boosted recipe)."}
    )
    use_bn_in_head: bool = field(default=False, metadata={"help": "BatchNorm after the head's hidden layers."})
    head_hidden_dim: int = field(default=2048, metadata={"help": "Hidden width of the DINO head."})
    head_bottleneck_dim: int = field(default=256, metadata={"help": "Bottleneck width of the DINO head."})
    head_nlayers: int = field(
        default=3,
        metadata={
            "help": "Linear layers of the head's MLP, the one into the bottleneck included "
            "(3: d -> 2048 -> 2048 -> 256)."
        },
    )


# The backbone trained when neither --model_name_or_path nor --backbone is given.
DEFAULT_MODEL = "vit_small_patch16"


def model_spec(args: "DinoTrainingArguments") -> str:
    """The backbone the run trains: `--backbone`, else `--model_name_or_path`, else `DEFAULT_MODEL`."""
    return args.backbone or args.model_name_or_path or DEFAULT_MODEL


# DinoConfig fields that have training arguments of their own.
_OWN_ARGUMENT = {"drop_path_rate": "--drop_path_rate", "image_size": "--global_crops_size"}


def preset_overrides(args: "DinoTrainingArguments") -> dict:
    """`--config_overrides` as typed DinoConfig fields, checked against the preset they change.

    The text is parsed by `PretrainedConfig.update_from_string` (transformers' `--config_overrides`):
    each key must be a field of the config and each value is read as that field's type.

    Raises:
        ValueError: overrides without a preset, an unknown field, a value of the wrong type, a field
            that has its own training argument, or a config the ViT cannot be built with.
    """
    if not args.config_overrides:
        return {}
    spec = model_spec(args)
    if spec not in PRESETS:
        fail(
            "config_overrides",
            args.config_overrides,
            f"it changes a DinoModel preset trained from scratch ({', '.join(PRESETS)}) given as "
            f"--model_name_or_path; got --model_name_or_path={spec!r} --backbone={args.backbone!r}",
        )
    config = DinoConfig.from_preset(spec)
    try:
        items = dict(item.split("=", 1) for item in args.config_overrides.split(","))
        items = {key.strip(): value.strip() for key, value in items.items()}
        keys = list(items)
        # A field whose preset value is None (layerscale_value) has no type to read the text as: a number.
        unset = {key: float(value) for key, value in items.items() if getattr(config, key, 0) is None}
        typed = ",".join(f"{key}={value}" for key, value in items.items() if key not in unset)
        if typed:
            config.update_from_string(typed)
        for key, value in unset.items():
            setattr(config, key, value)
    except (ValueError, TypeError) as error:
        fail("config_overrides", args.config_overrides, f"comma-separated key=value fields of DinoConfig ({error})")
    for key in keys:
        if key in _OWN_ARGUMENT:
            fail("config_overrides", args.config_overrides, f"set {key} with {_OWN_ARGUMENT[key]} instead")
    if config.hidden_size % config.num_attention_heads:
        fail(
            "config_overrides",
            args.config_overrides,
            f"hidden_size {config.hidden_size} must be a multiple of num_attention_heads {config.num_attention_heads}",
        )
    overrides = {key: getattr(config, key) for key in keys}
    try:
        DinoConfig.from_preset(spec, **overrides)  # the config's own checks of each value
    except ValueError as error:
        fail("config_overrides", args.config_overrides, str(error))
    return overrides


def check_crop_sizes(args: "DinoTrainingArguments", patch_size: int | None) -> None:
    """Both crop sizes must be multiples of the ViT's patch size (`None`: a CNN, any size goes)."""
    if not patch_size:
        return
    sizes = [("global_crops_size", args.global_crops_size)]
    if args.local_crops_number:
        sizes.append(("local_crops_size", args.local_crops_size))
    for name, size in sizes:
        if size % patch_size:
            below = size - size % patch_size
            examples = f"{below} or {below + patch_size}" if below else str(patch_size)
            fail(name, size, f"a multiple of the backbone's patch size {patch_size}, e.g. {examples}")
    size, scale = args.gram_teacher_crops_size, args.gram_teacher_resolution_scale
    if args.gram_loss_weight and scale != 1 and size % patch_size:
        fail(
            "gram_teacher_resolution_scale",
            scale,
            f"the Gram teacher's crops of {args.global_crops_size} x {scale:g} = {size} px must be a multiple of the "
            f"backbone's patch size {patch_size}; e.g. 2.0 gives {2 * args.global_crops_size}",
        )


def check_model(args: "DinoTrainingArguments") -> None:
    """The backbone to train: a preset with its overrides, a folder, a file, a timm name or a Hub id, and the crop
    sizes against a known patch size; the head's widths and the stochastic depth."""
    check_ranges(args, positive=("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers"))
    if not 0 <= args.drop_path_rate < 1:
        fail("drop_path_rate", args.drop_path_rate, "a rate in [0, 1)")
    overrides = preset_overrides(args)
    if args.model_name_or_path and args.backbone:
        fail("backbone", args.backbone, "leave it unset when --model_name_or_path is given (they are alternatives)")
    if args.backbone is not None:
        if not args.backbone.startswith(TIMM_PREFIX):
            fail(
                "backbone",
                args.backbone,
                "a timm model as timm:NAME, e.g. timm:resnet50; DinoModels go in --model_name_or_path",
            )
        check_timm_name("backbone", args.backbone)
        return
    spec = model_spec(args)
    if spec.startswith(TIMM_PREFIX):
        check_timm_name("model_name_or_path", spec)
    elif spec in PRESETS:
        check_crop_sizes(args, DinoConfig.from_preset(spec, **overrides).patch_size)
    elif os.path.isdir(spec):
        config_file = Path(spec) / "config.json"
        _refuse_checkpoint_parts(spec)
        if not config_file.is_file():
            fail("model_name_or_path", spec, f"{accepted_models_text()} (this folder has no config.json)")
        config = json.loads(config_file.read_text())
        if "architecture" not in config:  # a transformers folder; timm folders are checked once built
            try:
                model_type = check_vision_config(config, spec)
            except ValueError as error:
                raise ValueError(f"--model_name_or_path: {error}") from None
            if model_type == DinoConfig.model_type or FAMILIES[model_type].fixed_patch_grid:
                check_crop_sizes(args, config.get("patch_size"))
    elif os.path.isfile(spec):
        _refuse_checkpoint_parts(spec)
        if not spec.endswith((".pth", ".pt", ".safetensors")):
            fail("model_name_or_path", spec, "a reference DINO checkpoint file ending in .pth, .pt or .safetensors")
    elif missing_local_path(spec):
        fail("model_name_or_path", spec, "an existing folder or checkpoint file: nothing is at that path")
    elif not is_hub_id(spec):
        fail(
            "model_name_or_path",
            spec,
            f"a DinoModel preset ({', '.join(PRESETS)}), an existing folder or checkpoint file, or a Hub id org/name",
        )


def _refuse_checkpoint_parts(spec: str) -> None:
    """A training checkpoint, or a file of one, is no model to start from: --init_from_checkpoint takes it."""
    path = Path(spec)
    if is_checkpoint(path):
        holder, what = path, "a training checkpoint"
    elif path.is_file() and (holder := checkpoint_holding(path)) is not None:
        what = f"the file {path.name} of the training checkpoint {holder}"
    else:
        return
    fail(
        "model_name_or_path",
        spec,
        f"a model, and this is {what}: start from all of it (student, teacher, heads, center) with "
        f"--init_from_checkpoint {holder}, or from its teacher backbone alone with --model_name_or_path "
        f"{holder / 'teacher_backbone'}",
    )


def check_timm_name(field_name: str, spec: str) -> None:
    """`spec` is timm:NAME with a NAME that timm knows (or a hf-hub: / local-dir: reference)."""
    name = spec.removeprefix(TIMM_PREFIX)
    if not is_external_timm_name(name) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(TIMM_PREFIX + match for match in close)})" if close else ""
        fail(field_name, spec, f"a model name that timm knows, see timm.list_models(){hint}")


__all__ = [
    "DEFAULT_MODEL",
    "ModelArguments",
    "check_crop_sizes",
    "check_model",
    "check_timm_name",
    "model_spec",
    "preset_overrides",
]
