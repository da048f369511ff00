"""Model folders that load without dino_hf's training code.

- `export_backbone` writes a trained backbone (a `DinoModel` or a timm model) as a folder: a DinoModel
  through `save_pretrained` (`AutoModel`, `pipeline("image-feature-extraction")`), a timm model as a
  timm folder (`timm.create_model("local-dir:PATH")` and transformers' `TimmWrapperModel`), both with
  DINO's evaluation transform as their image preprocessing.
- `save_as_vit` writes a `DinoModel` as a stock transformers `ViTModel` folder that loads with
  `AutoModel` alone; `to_vit_model` returns that `ViTModel`. ViT has no place for registers or
  LayerScale: such a model is refused there (`as_plain_vit`).
- `save_as_timm` writes a `DinoModel` (LayerScale included, as timm's `init_values`) as a timm folder
  that loads with `timm.create_model("local-dir:PATH", pretrained=True)` and with `TimmWrapperModel`;
  `to_timm_model` returns that timm `VisionTransformer`.
- `dino_to_dinov2_with_registers` returns a `DinoModel` (with or without registers and LayerScale) as
  transformers' `Dinov2WithRegistersModel`, which `AutoModel` loads alone
  (docs/formats.md#dinov2-with-registers).

All of them compute the same features at the native image size; at other sizes each library
interpolates the position embeddings its own way (docs/recipe.md#position-embedding-interpolation).
"""

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoImageProcessor,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)

from ..models.backbones import DinoModelBackbone, TimmBackbone, TransformersBackbone
from ..models.configuration_dino import PRESETS, DinoConfig
from ..models.image_processing_dino import dino_image_processor
from ..models.modeling_dino import DinoModel
from ..models.normalization import IMAGENET, Normalization, normalization_of
from .timm_weights import DINO_LAYER_NORM_EPS, dino_to_timm_state_dict

# Keys of a timm `pretrained_cfg` that describe the exported weights and their preprocessing; the others
# (tag, license, origin_url, paper_ids, ...) describe the weights the architecture was published with.
_TIMM_CFG_KEYS = (
    "custom_load",
    "input_size",
    "min_input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# A trained backbone, as it is


def export_backbone(
    backbone_model: nn.Module, output_dir: str | Path, *, image_size: int = 224, model_card: ModelCard | None = None
) -> Path:
    """Write `backbone_model` (a `DinoModel`, a timm model, or their `build_backbone` wrappers) to the
    folder `output_dir`, replacing it whole.

    The image preprocessing at `image_size` goes with the weights, normalised with the backbone's own mean
    and std (`normalization_of`: those of the weights it started from, ImageNet's from scratch; what its
    training crops were normalised with): DINO's evaluation transform (resize 256/224 x `image_size`
    bicubic, centre crop), or for a transformers model the image processor of the checkpoint it started
    from, resized (`source_image_processor`). A DinoModel folder holds config.json, model.safetensors,
    its modeling code and preprocessor_config.json. A timm folder holds model.safetensors and
    config.json (`architecture`, `num_classes: 0`, `num_features`, `model_args`, and the transform as
    `pretrained_cfg`, which both timm and transformers' `AutoImageProcessor` read for timm models).
    README.md is written when `model_card` is given. The folder is written under a temporary name and
    renamed, so an interrupted export never leaves a half-written folder.
    Returns `output_dir`.
    """
    wrappers = (TimmBackbone, DinoModelBackbone, TransformersBackbone)
    model = backbone_model.model if isinstance(backbone_model, wrappers) else backbone_model
    source = backbone_model.source if isinstance(backbone_model, TransformersBackbone) else None
    normalization = normalization_of(backbone_model)
    output_dir = Path(output_dir).resolve()
    staging = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if isinstance(model, DinoModel):
            model.save_pretrained(staging)
            dino_image_processor(image_size, normalization.mean, normalization.std).save_pretrained(staging)
        elif isinstance(model, PreTrainedModel):
            with_feature_pooler(model).save_pretrained(staging)
            source_image_processor(source, image_size, normalization).save_pretrained(staging)
        elif is_timm_model(model):
            _save_timm_folder(model, staging, image_size, normalization)
        else:
            raise TypeError(
                f"cannot export a {type(model).__name__}: expected a DinoModel, a transformers model or a timm model "
                "(or the backbone wrappers that build_backbone returns)"
            )
        if model_card is not None:
            model_card.save(staging / "README.md")
        _replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def with_feature_pooler(model: PreTrainedModel) -> PreTrainedModel:
    """`model` as it is exported: a ViT or DeiT gets a pooler that passes the CLS token after the final LayerNorm
    through (an identity dense with a linear activation), so that `pooler_output`, and with it
    `pipeline("image-feature-extraction", pool=True)`, is the global feature dino_hf trained (the checkpoint's
    own dense + tanh pooler is never trained, and `AutoModel` gives a model saved without one a random one).
    Other models are exported as they are."""
    if model.config.model_type not in ("vit", "deit"):
        return model
    config = copy.deepcopy(model.config)
    config.pooler_act, config.pooler_output_size = "linear", config.hidden_size
    state = {key: tensor for key, tensor in model.state_dict().items() if not key.startswith("pooler.")}
    state["pooler.dense.weight"] = torch.eye(config.hidden_size)  # (D, D): the CLS token passes through
    state["pooler.dense.bias"] = torch.zeros(config.hidden_size)
    mask_token = any(key.endswith("mask_token") for key in state)
    with torch.device("meta"):
        exported = type(model)(config, add_pooling_layer=True, use_mask_token=mask_token)
    exported.load_state_dict(state, strict=True, assign=True)
    return exported


def source_image_processor(source: str | None, image_size: int, normalization: Normalization = IMAGENET):
    """The image processor of the checkpoint a run started from, set to the training crop size and to
    `normalization` (what the training crops were normalised with); DINO's evaluation transform with
    `normalization` when the source has none.

    The processor keeps its class, resampling and ratio of resize to crop (256 / 224 for DINOv2's
    processors); its sizes are rewritten in the keys its class reads (ConvNeXt's `shortest_edge` with its
    `crop_pct`, a ViT's `height` and `width`). A processor that does not then turn an image into
    `image_size` x `image_size` pixels is replaced by DINO's evaluation transform, with a warning.
    """
    processor = None
    if source is not None:
        try:
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):
            processor = None
    fallback = dino_image_processor(image_size, normalization.mean, normalization.std)
    if processor is None:
        return fallback
    config = processor.to_dict()
    config.update(
        _processor_sizes(config, image_size),
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(normalization.mean),
        image_std=list(normalization.std),
    )
    processor = type(processor).from_dict(config)
    # A processor class of its own may read its sizes in ways this function does not know: the export
    # must still load and give the training size in stock transformers.
    try:
        size = tuple(processor(_probe_image(image_size), return_tensors="pt")["pixel_values"].shape[-2:])
    except Exception as error:  # whatever a processor of its own raises, the fallback holds
        size = f"an error ({type(error).__name__}: {error})"
    if size != (image_size, image_size):
        logger.warning(
            "the image processor of %s (%s) gives %s at the training size %d px instead of %d x %d; the export "
            "carries DINO's evaluation transform (BitImageProcessor) with the same mean and std instead",
            source,
            type(processor).__name__,
            size,
            image_size,
            image_size,
            image_size,
        )
        return fallback
    return processor


def _processor_sizes(config: dict, image_size: int) -> dict:
    """The `size` (and `crop_size`) entries of an image processor's config that make it output
    `image_size` x `image_size` pixels, in the keys its class reads."""
    size, crop = config.get("size") or {}, config.get("crop_size") or {}
    if "crop_pct" in config and size.get("shortest_edge"):
        # ConvNeXt: resizes the short side to shortest_edge / crop_pct and centre-crops shortest_edge
        # (from 384 px on, resizes straight to shortest_edge x shortest_edge).
        return {"size": {"shortest_edge": image_size}}
    if config.get("do_center_crop") and crop:
        crop_side = crop.get("height") or image_size
        resize_side = size.get("shortest_edge") or size.get("height") or crop_side
        resized = round(image_size * resize_side / crop_side)
        resize = {"shortest_edge": resized} if size.get("shortest_edge") else {"height": resized, "width": resized}
        return {"size": resize, "crop_size": {"height": image_size, "width": image_size}}
    return {"size": {"height": image_size, "width": image_size}}


def _probe_image(image_size: int) -> Image.Image:
    """A landscape image larger than the crop, for checking what a processor outputs."""
    return Image.new("RGB", (image_size * 3 // 2 + 7, image_size + 5))


def loading_snippet(folder: str | Path) -> str:
    """One line of Python that loads the export in `folder`: timm for a timm folder, `AutoModel` for a
    transformers one (after `import dino_hf` for a DinoModel, which registers it)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if "architecture" in config:
        return f'import timm; model = timm.create_model("local-dir:{folder}", pretrained=True)'
    load = f'from transformers import AutoModel; model = AutoModel.from_pretrained("{folder}")'
    return f"import dino_hf; {load}" if config.get("model_type") == DinoConfig.model_type else load


def is_timm_model(model: nn.Module) -> bool:
    """Whether `model` is a timm model (it has a `pretrained_cfg` dict and `num_features`)."""
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and hasattr(model, "num_features")


def _save_timm_folder(model: nn.Module, folder: Path, image_size: int, normalization: Normalization) -> None:
    """timm's own `save_for_hf` (safetensors), with the config made loadable by transformers too.

    `model_args` loses `num_classes` (kept at the top level and in `pretrained_cfg`): transformers'
    `TimmWrapperModel` passes num_classes=0 itself and fails on a duplicate. `pretrained_cfg` is DINO's
    evaluation transform (bicubic, crop 224/256, as in `save_as_timm`) with `normalization`'s mean and std.
    """
    if model.num_classes != 0:
        raise ValueError(
            f"the timm model has a {model.num_classes}-class classifier; DINO backbones are built with "
            "num_classes=0 (build_backbone does this): export the backbone, not a classifier"
        )
    data_config = dict(
        input_size=(3, image_size, image_size),
        interpolation="bicubic",
        crop_pct=224 / 256,
        crop_mode="center",
        mean=tuple(normalization.mean),
        std=tuple(normalization.std),
    )
    timm.models.save_for_hf(model, folder, safe_serialization=True, data_config=data_config)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    source_cfg = config["pretrained_cfg"]
    config["pretrained_cfg"] = {"tag": "dino", **{key: source_cfg[key] for key in _TIMM_CFG_KEYS if key in source_cfg}}
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`; an older `target` is removed once replaced."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        new.rename(target)


# ---------------------------------------------------------------------------------------------------
# A DinoModel, as transformers' ViT or as timm's VisionTransformer


def save_as_vit(model: DinoModel, save_directory: str | Path) -> None:
    """Write a transformers ViT folder that `AutoModel` loads without dino_hf: config.json (model_type
    "vit"), model.safetensors in the on-disk names of facebook/dino-* and preprocessor_config.json
    (DINO's evaluation transform, with the mean and std recorded on `model` by `set_normalization_`,
    ImageNet's when none is).

    The pooler is an identity Linear with a "linear" activation, so `pooler_output` is the DINO feature
    (the CLS token after the final norm). At other image sizes `ViTModel` needs
    `interpolate_pos_encoding=True`, which interpolates slightly differently from DINO.
    """
    normalization = normalization_of(model)  # before as_plain_vit, whose copy records none
    model = as_plain_vit(model, "vit")
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
    dino_image_processor(config.image_size, normalization.mean, normalization.std).save_pretrained(save_directory)


def to_vit_model(model: DinoModel) -> ViTModel:
    """A stock transformers `ViTModel` with the same weights, loaded from a `save_as_vit` folder."""
    with tempfile.TemporaryDirectory() as folder:
        save_as_vit(model, folder)
        return ViTModel.from_pretrained(folder).eval()


def timm_model_args(config: DinoConfig) -> dict:
    """Keyword arguments of timm's `VisionTransformer` for the same network (num_classes aside); a
    LayerScale is timm's `init_values`."""
    if config.layer_norm_eps != DINO_LAYER_NORM_EPS or config.hidden_act != "gelu":
        raise ValueError(
            f"timm's ViT has LayerNorm eps 1e-6 and GELU; this model has eps {config.layer_norm_eps} and "
            f"{config.hidden_act!r}: export it with save_as_vit instead"
        )
    mlp_ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != config.intermediate_size:
        raise ValueError(f"intermediate size {config.intermediate_size} is not expressible as a timm mlp_ratio")
    layer_scale = {} if config.layerscale_value is None else {"init_values": config.layerscale_value}
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
        **layer_scale,
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
    model = as_plain_vit(model, "timm")
    timm_model = timm.create_model(
        _timm_architecture(model.config), pretrained=False, num_classes=0, **timm_model_args(model.config)
    )
    timm_model.load_state_dict(dino_to_timm_state_dict(model.state_dict()), strict=True)
    return timm_model.eval()


def save_as_timm(model: DinoModel, save_directory: str | Path) -> None:
    """Write a timm folder: model.safetensors in timm's names and a config.json with `architecture`,
    `model_args` and `pretrained_cfg` (DINO's evaluation transform: bicubic, crop 224/256, with the mean
    and std recorded on `model` by `set_normalization_`, ImageNet's when none is).

    Unlike timm's `save_for_hf`, `model_args` leaves out `num_classes` (kept at the top level and in
    `pretrained_cfg`): transformers' `TimmWrapperModel` passes num_classes=0 itself and fails on a
    duplicate. The folder loads with `timm.create_model("local-dir:PATH", pretrained=True)` and with
    `TimmWrapperModel.from_pretrained(PATH)`.
    """
    normalization = normalization_of(model)  # before as_plain_vit, whose copy records none
    model = as_plain_vit(model, "timm")
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
            "mean": list(normalization.mean),
            "std": list(normalization.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    (save_directory / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")


def as_plain_vit(model: DinoModel, target: str) -> DinoModel:
    """`model` as the ViT and timm layouts can hold it (`save_as_vit`, `save_as_timm`): without the mask
    token, which only training with masked patches uses (a copy; `model` itself when it has none).

    Raises:
        ValueError: a model with register tokens, for which `target` ("vit", "timm") has no place, or
            with LayerScale, for which "vit" (transformers' ViTModel) has none (timm holds it).
    """
    if model.config.num_register_tokens:
        raise ValueError(
            f"this DinoModel has {model.config.num_register_tokens} register tokens, which the {target} layout "
            f"cannot hold; export it as a DinoModel folder or as transformers' Dinov2WithRegistersModel "
            f"(dino_hf.convert.export.dino_to_dinov2_with_registers)"
        )
    if target == "vit" and model.config.layerscale_value is not None:
        raise ValueError(
            f"this DinoModel has LayerScale (layerscale_value={model.config.layerscale_value}), which "
            f"transformers' ViTModel cannot hold; export it as a DinoModel folder, as transformers' "
            f"Dinov2WithRegistersModel (dino_hf.convert.export.dino_to_dinov2_with_registers, which AutoModel "
            f"loads without dino_hf) or as timm (save_as_timm, --to timm)"
        )
    if model.embeddings.mask_token is None:
        return model
    config = copy.deepcopy(model.config)
    config.use_mask_token = False
    plain = DinoModel(config)
    plain.load_state_dict({key: value for key, value in model.state_dict().items() if key != "embeddings.mask_token"})
    return plain.to(device=model.device, dtype=model.dtype).eval()


# ---------------------------------------------------------------------------------------------------
# A DinoModel, as transformers' Dinov2WithRegistersModel

# DinoModel block module -> Dinov2WithRegistersModel block module, in the names transformers v5 holds in
# memory (on disk its attention is `attention.attention.{query,key,value}` and `attention.output.dense`,
# as DinoModel's). The other weights (`embeddings.*`, `layernorm`) have the same names in both.
DINOV2_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def dinov2_block_key(key: str, block_names: dict[str, str]) -> str | None:
    """`encoder.layer.{i}.{module}.{param}` with `module` renamed by `block_names`; None for another key."""
    head, separator, rest = key.partition("encoder.layer.")
    if head or not separator:
        return None
    index, _, name = rest.partition(".")
    module, _, param = name.rpartition(".")
    if module not in block_names:
        return None
    return f"encoder.layer.{index}.{block_names[module]}.{param}"


def dinov2_with_registers_config(config: DinoConfig) -> Dinov2WithRegistersConfig:
    """The `Dinov2WithRegistersConfig` of the same network: plain GELU MLP (`use_swiglu_ffn=False`),
    `layerscale_value` DinoModel's (1 without LayerScale: Dinov2 always has one), stochastic depth
    DinoModel's `drop_path_rate` with `drop_path_uniform` (Dinov2's is one rate for all blocks), else 0
    (the released checkpoints' value; DinoModel's grows over the blocks, so a fine-tuning run sets its own).

    Raises:
        ValueError: an MLP width that is not a whole multiple of the hidden size (Dinov2 has `mlp_ratio`,
            an int, where DinoModel has `intermediate_size`).
    """
    if config.intermediate_size % config.hidden_size:
        raise ValueError(
            f"Dinov2WithRegistersConfig sets the MLP width as hidden_size x mlp_ratio (an int); intermediate_size "
            f"{config.intermediate_size} is not a multiple of hidden_size {config.hidden_size}"
        )
    return Dinov2WithRegistersConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size // config.hidden_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        qkv_bias=config.qkv_bias,
        layerscale_value=1.0 if config.layerscale_value is None else config.layerscale_value,
        drop_path_rate=config.drop_path_rate if config.drop_path_uniform else 0.0,
        use_swiglu_ffn=False,
        num_register_tokens=config.num_register_tokens,
        architectures=["Dinov2WithRegistersModel"],
    )


def dino_to_dinov2_with_registers(model: DinoModel) -> Dinov2WithRegistersModel:
    """A transformers `Dinov2WithRegistersModel` computing what `model` computes at its native image size.

    The LayerScale vectors are DinoModel's, or exactly 1 when it has none; the registers are copied
    (none when the DinoModel has none), and the mask token is DinoModel's, or zeros (Dinov2's init) when
    it has none. At other image sizes the two interpolate the position embeddings differently
    (docs/formats.md#dinov2-with-registers). `save_pretrained` of the result writes a folder that
    `AutoModel` loads without dino_hf.
    """
    config = model.config
    target = Dinov2WithRegistersModel(dinov2_with_registers_config(config))
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "embeddings.mask_token":
            state[key] = tensor.reshape(1, config.hidden_size)  # (1, D): Dinov2's shape
        else:
            state[dinov2_block_key(key, DINOV2_BLOCK_NAMES) or key] = tensor
    target_state = target.state_dict()
    for key, tensor in target_state.items():
        if key.endswith(".lambda1"):
            state.setdefault(key, torch.ones_like(tensor))  # (D,): where DinoModel has none, 1 changes nothing
        elif key == "embeddings.mask_token":
            state.setdefault(key, torch.zeros_like(tensor))
        elif key == "embeddings.register_tokens" and not config.num_register_tokens:
            state[key] = tensor  # (1, 0, D)
    target.load_state_dict(state, strict=True)
    return target.to(device=model.device, dtype=model.dtype).eval()


__all__ = [
    "DINOV2_BLOCK_NAMES",
    "as_plain_vit",
    "dino_to_dinov2_with_registers",
    "dinov2_block_key",
    "dinov2_with_registers_config",
    "export_backbone",
    "is_timm_model",
    "loading_snippet",
    "save_as_timm",
    "source_image_processor",
    "save_as_vit",
    "timm_model_args",
    "to_timm_model",
    "to_vit_model",
]
