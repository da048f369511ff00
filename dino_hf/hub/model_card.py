"""Model cards of exported backbones.

`render_model_card` fills the template `model_cards/backbone.md` from real values: the architecture
and size read off the model, the training recipe, the data, the hardware and measured accuracies
(`EvalFigure`, which also go into the card's `model-index`). A section whose data is unknown is left
out rather than shown empty, and fields that hold secrets (`*token*`) never reach the card.
"""

import dataclasses
import importlib.resources
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm.models
from huggingface_hub import EvalResult, ModelCard, ModelCardData, hf_hub_download
from torch import nn
from transformers import PreTrainedModel

from ..convert.export import is_timm_model
from ..models.backbones import DinoModelBackbone, TimmBackbone
from ..models.modeling_dino import DinoModel
from ..models.normalization import IMAGENET, Normalization, normalization_of
from ..models.references import is_hub_id
from ..models.transformers_backbone import FAMILIES, TransformersBackbone

MODEL_CARD_TEMPLATE = "backbone.md"
_SECRET_WORDS = ("token", "secret", "password")
_DINO_CITATION_ARXIV = "arxiv:2104.14294"


@dataclasses.dataclass(frozen=True)
class EvalFigure:
    """One measured accuracy for the model card and its `model-index`.

    Args:
        name (`str`): what was measured, e.g. `"k-NN top-1 (k=20)"` or `"linear probe top-1"`.
        value (`float`): the accuracy in percent, e.g. `74.5`.
        dataset (`str`): the evaluation dataset, a Hub id where there is one (e.g. `"imagenet-1k"`).
        split (`str`, defaults to `"validation"`): the split the figure was measured on.
    """

    name: str
    value: float
    dataset: str
    split: str = "validation"


def model_card_template_path(name: str = MODEL_CARD_TEMPLATE) -> Path:
    """Path of a model card template: `model_cards/<name>` of a source checkout, else the copy
    installed with the package (`dino_hf.model_cards`)."""
    in_checkout = Path(__file__).resolve().parents[2] / "model_cards" / name
    if in_checkout.is_file():
        return in_checkout
    try:
        installed = importlib.resources.files("dino_hf.model_cards") / name
    except ModuleNotFoundError:
        installed = None
    if installed is not None and installed.is_file():
        return Path(str(installed))
    raise FileNotFoundError(
        f"model card template {name!r} not found in {in_checkout.parent} nor in the installed package "
        "(dino_hf.model_cards); reinstall dino_hf or run from a source checkout"
    )


def render_model_card(
    model: nn.Module,
    model_id: str,
    *,
    training_args: Mapping[str, Any] | Any = None,
    datasets: Sequence[str] = (),
    steps: int | None = None,
    epochs: float | None = None,
    hardware: str | None = None,
    evaluation: Sequence[EvalFigure] = (),
    base_model: str | None = None,
    license: str = "apache-2.0",
    image_size: int | None = None,
    distilled_from: Sequence[str] = (),
    title: str | None = None,
    ema_student: bool = False,
    trained_parameters: str | None = None,
) -> ModelCard:
    """The model card of an exported backbone, rendered from `model_cards/backbone.md`.

    Args:
        model: the exported backbone: a `DinoModel`, a timm model or a `build_backbone` wrapper.
        model_id: the Hub id (or folder) that the card's loading snippets use.
        training_args: the resolved training hyperparameters (a mapping or a dataclass such as
            `DinoTrainingArguments`); fields that hold secrets (`*token*`) and unset fields are left out.
        datasets: the pretraining data; names that look like Hub dataset ids go into the metadata.
        steps, epochs: how long the model was trained.
        hardware: e.g. `"8x A100 80GB, 21 h"`.
        evaluation: measured figures; they go into the card and its `model-index`.
        base_model: the Hub id or folder of the weights training started from, if any (a Hub id also goes
            into the metadata); a `TransformersBackbone`'s own source when not given.
        license: the license of the weights.
        image_size: the crop size of the exported preprocessing (`export_backbone(image_size=...)`);
            defaults to the size the model was built for.
        distilled_from: the frozen models a distilled student learnt from (`--distill_from`); empty for DINO.
        title: the card's title; the last part of `model_id` by default.
        ema_student: the export is the EMA of the distilled student (`--distill_ema_student`).
        trained_parameters: which parameters were trained when not all were (a LoRA run: the factors, merged
            into this export, the unfrozen blocks and the norms).

    Sections whose data is unknown (no evaluation, no recipe) are left out, so the card never shows an
    empty field or a placeholder.
    """
    if base_model is None and isinstance(model, TransformersBackbone):
        base_model = model.source
    normalization = normalization_of(model)
    model = model.model if isinstance(model, (TimmBackbone, DinoModelBackbone, TransformersBackbone)) else model
    description = _describe(model, model_id)
    description["image_size"] = image_size or description["image_size"]
    title = title or model_id.rstrip("/").split("/")[-1]
    card_data = _card_data(description["library_name"], title, license, datasets, evaluation, base_model)
    if distilled_from:
        card_data.tags.append("distillation")
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template_path()),
        title=title,
        model_id=model_id,
        datasets=list(datasets),
        progress=_progress(steps, epochs),
        hardware=hardware,
        recipe_rows=_table_rows(training_args),
        evaluation=list(evaluation),
        base_model=base_model,
        distilled_from=[{"name": name, "licence": model_licence(name)} for name in distilled_from],
        ema_student=ema_student,
        trained_parameters=trained_parameters,
        normalization=_normalization_text(normalization),
        **description,
    )


def _card_data(
    library_name: str, title: str, license: str, datasets: Sequence[str], evaluation: Sequence[EvalFigure], base_model
) -> ModelCardData:
    """The card's metadata: the Hub dataset ids among `datasets`, the figures as a `model-index`, a Hub
    `base_model`."""
    eval_results = [_eval_result(figure) for figure in evaluation]
    return ModelCardData(
        library_name=library_name,
        pipeline_tag="image-feature-extraction",
        license=license,
        tags=["dino", "self-supervised", "image-feature-extraction", "vision", "dino_hf", _DINO_CITATION_ARXIV],
        datasets=[name for name in datasets if is_hub_id(name, allow_bare_name=True)] or None,
        base_model=base_model if base_model and is_hub_id(base_model) else None,
        metrics=["accuracy"] if eval_results else None,
        eval_results=eval_results or None,
        model_name=title if eval_results else None,
    )


def _progress(steps: int | None, epochs: float | None) -> str:
    """How long the model was trained, e.g. "1,000 steps, 12 epochs" ("" when unknown)."""
    return ", ".join(
        part for part in (f"{steps:,} steps" if steps else "", f"{epochs:g} epochs" if epochs else "") if part
    )


def _normalization_text(normalization: Normalization) -> str:
    """How the card names the input's normalisation."""
    if normalization == IMAGENET:
        return "ImageNet mean and std"
    mean, std = (", ".join(f"{value:g}" for value in values) for values in normalization)
    return f"normalised with mean ({mean}) and std ({std})"


def _eval_result(figure: EvalFigure) -> EvalResult:
    """A measured figure as the metadata's `model-index` entry."""
    return EvalResult(
        task_type="image-classification",
        dataset_type=figure.dataset,
        dataset_name=figure.dataset,
        dataset_split=figure.split,
        metric_type="accuracy",
        metric_name=figure.name,
        metric_value=round(float(figure.value), 2),
    )


# DinoConfig's DINOv2 options: listed on the card when they are on.
_DINOV2_FIELDS = ("num_register_tokens", "layerscale_value", "drop_path_uniform", "use_mask_token")


def model_licence(name_or_path: str) -> str | None:
    """The licence a model's own card names (`license:` in the metadata of the README.md of its folder, or of its
    Hub repository's copy in the local cache); None when there is none to read here."""
    path = Path(str(name_or_path).removeprefix("timm:"))
    readme = path / "README.md"
    if not readme.is_file() and is_hub_id(str(name_or_path)):
        try:
            readme = Path(hf_hub_download(str(name_or_path), "README.md", local_files_only=True))
        except Exception:  # not in the cache (offline, gated, no card): the card says where to look instead
            return None
    if not readme.is_file():
        return None
    try:
        licence = ModelCard.load(readme).data.license
    except Exception:  # a README without card metadata
        return None
    return str(licence) if licence else None


def _describe(model: nn.Module, model_id: str) -> dict[str, Any]:
    """Template values that come from the model itself."""
    count = sum(p.numel() for p in model.parameters())
    num_parameters = f"{count / 1e6:.1f} M" if count >= 100_000 else f"{count:,}"
    if isinstance(model, DinoModel):
        config = model.config
        fields = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
            "layer_norm_eps",
            "qkv_bias",
            "drop_path_rate",
        )
        return dict(
            library_name="transformers",
            architecture=f"DinoModel (ViT, {config.num_hidden_layers} blocks, {config.num_attention_heads} heads)",
            architecture_summary=f"Vision Transformer with {config.patch_size}x{config.patch_size} patches",
            num_parameters=num_parameters,
            feature_size=config.hidden_size,
            feature_description="the CLS token after the final LayerNorm",
            patch_size=config.patch_size,
            image_size=config.image_size,
            config_rows=[(name, getattr(config, name)) for name in fields]
            + [(name, getattr(config, name)) for name in _DINOV2_FIELDS if getattr(config, name, None)],
            # dino_hf.convert.export.to_timm_model needs timm's LayerNorm eps and activation.
            timm_convertible=config.layer_norm_eps == 1e-6
            and config.hidden_act == "gelu"
            and not config.num_register_tokens,
        )
    if isinstance(model, PreTrainedModel):
        return _describe_transformers(model, num_parameters)
    if not is_timm_model(model):
        raise TypeError(
            f"cannot describe a {type(model).__name__}: expected a DinoModel, a transformers model or a timm model"
        )
    architecture = model.pretrained_cfg.get("architecture") or type(model).__name__
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    patch_embed = getattr(model, "patch_embed", None)
    return dict(
        library_name="timm",
        architecture=f"timm `{architecture}`",
        architecture_summary=f"timm `{architecture}` backbone",
        num_parameters=num_parameters,
        feature_size=getattr(model, "head_hidden_size", None) or model.num_features,
        feature_description="the CLS token after the final norm" if pool == "token" else "the pooled final features",
        patch_size=patch_embed.patch_size[0] if patch_embed is not None else None,
        image_size=model.pretrained_cfg.get("input_size", (3, 224, 224))[-1],
        config_rows=_table_rows(timm.models.get_model_args(model, {})),
        timm_model_name=f"hf-hub:{model_id}" if is_hub_id(model_id, allow_bare_name=True) else f"local-dir:{model_id}",
    )


def _describe_transformers(model: PreTrainedModel, num_parameters: str) -> dict[str, Any]:
    """Template values of a stock transformers backbone (Dinov2Model, ViTModel, ConvNextModel, ...)."""
    config = model.config
    family = FAMILIES[config.model_type]
    backbone = TransformersBackbone(model, family)
    patch_size = backbone.patch_size
    uses_cls = family.feature == "cls"
    image_size = getattr(config, "image_size", None) or 224
    return dict(
        library_name="transformers",
        stock_transformers=True,
        architecture=f"transformers `{type(model).__name__}`",
        architecture_summary=f"transformers `{type(model).__name__}` backbone",
        num_parameters=num_parameters,
        feature_size=backbone.num_features,
        feature_description=(
            "the CLS token after the final norm"
            if uses_cls or family.fixed_patch_grid
            else "the pooled, normalised final features"
        ),
        feature_code="last_hidden_state[:, 0]" if uses_cls else "pooler_output",
        patch_size=patch_size,
        image_size=image_size if isinstance(image_size, int) else image_size[0],
        config_rows=[],
    )


def _table_rows(values: Mapping[str, Any] | Any) -> list[tuple[str, str]]:
    """(name, value) rows of a mapping or dataclass, without secrets and without unset values."""
    if values is None:
        return []
    if dataclasses.is_dataclass(values):
        values = {field.name: getattr(values, field.name) for field in dataclasses.fields(values)}
    rows = []
    for name, value in values.items():
        if any(word in name.lower() for word in _SECRET_WORDS) or value is None or value == "" or value == []:
            continue
        rows.append((name, ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)))
    return rows
