"""Zero-shot classification of a labelled image folder by a CLIP-like model folder
(docs/evaluation.md#zero-shot-classification; CLIP, Radford et al. 2021, Sec. 3.1.4).

Each class gets the prompts `template.format(class name)`; its embedding is the L2-normalised mean of
the L2-normalised text embeddings of its prompts (CLIP's prompt ensembling). An image's logits are the
cosine similarities of its L2-normalised image embedding with the class embeddings; top-1, and top-5
when there are 5 classes or more. The model is any folder with a text and an image tower that `AutoModel`
loads: CLIPModel, SiglipModel, Siglip2Model, MetaClip2Model, VisionTextDualEncoderModel (the student
export of `dino_hf.convert.zero_shot`), with its tokenizer and image processor.
"""

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from accelerate import PartialState
from datasets import ClassLabel
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, PreTrainedModel

from ..convert.export import source_image_processor
from ..data.sources import load_image_stream
from ..models.normalization import processor_normalization
from ..models.references import is_hub_id

# The 7 of CLIP's 80 ImageNet prompt templates whose ensemble its authors found best
# (github.com/openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb).
DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# SigLIP's text towers were trained on text padded to 64 tokens and read the last position; transformers'
# zero-shot pipeline pads SigLIP text so too.
SIGLIP_TEXT_LENGTH = 64

# Prompts per forward pass of the text tower.
TEXT_BATCH_SIZE = 256


@dataclass
class ZeroShotModel:
    """A CLIP-like model (eval mode, float32) with its tokenizer and image processor.

    `text_model_type` is its text tower's `model_type` ("clip_text_model", "siglip_text_model", ...): it
    decides how prompts are padded (`text_inputs`)."""

    model: PreTrainedModel
    tokenizer: object
    image_processor: object
    text_model_type: str

    def transform(self, image) -> torch.Tensor:
        """A PIL image -> `pixel_values (3, S, S)` as the model's image processor makes them."""
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def load_zero_shot_model(name_or_path: str, image_size: int | None = None) -> ZeroShotModel:
    """The CLIP-like model at `name_or_path` with its tokenizer and image processor; at `image_size`, the
    processor resizes and crops to that size instead of its own (`source_image_processor`), with its own
    mean and std. A folder that is no model, or a model without a text tower, is refused."""
    if not os.path.isdir(name_or_path) and not is_hub_id(name_or_path):
        raise ValueError(f"--model {name_or_path} is neither a folder nor a Hub id (org/name)")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {name_or_path} does not load as a model: {str(error).splitlines()[0]}") from None
    text_config = getattr(config, "text_config", None)
    if text_config is None:  # before the weights are read
        raise ValueError(
            f"--model {name_or_path} is a {config.model_type} model, which has no text tower; zero-shot "
            "classification takes a CLIP-like model (CLIPModel, SiglipModel, VisionTextDualEncoderModel, ...)"
        )
    model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
    if not all(callable(getattr(model, method, None)) for method in ("get_text_features", "get_image_features")):
        raise ValueError(f"--model {name_or_path}: a {type(model).__name__} gives no text and image embeddings")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model {name_or_path}: its tokenizer or image processor does not load: {str(error).splitlines()[0]}"
        ) from None
    if image_size is not None:
        normalization = processor_normalization(image_processor.to_dict(), str(name_or_path))
        image_processor = source_image_processor(str(name_or_path), image_size, normalization)
    return ZeroShotModel(model.eval(), tokenizer, image_processor, text_config.model_type)


def labelled_folder(eval_dir: str) -> tuple[object, str, list[str]]:
    """`(rows, image_column, class_names)` of an image folder with one sub-folder of images per class: the
    rows' `label` is the sub-folder's index in sorted order, its class name the sub-folder's name with
    underscores as spaces. A folder with fewer than 2 classes is refused."""
    if not os.path.isdir(eval_dir):
        raise ValueError(f"--eval_dir {eval_dir} is not a folder")
    rows, image_column = load_image_stream(train_dir=eval_dir)
    feature = (rows.features or {}).get("label")
    names = feature.names if isinstance(feature, ClassLabel) else []
    if len(names) < 2:
        raise ValueError(
            f"--eval_dir {eval_dir} has {len(names)} class sub-folders; zero-shot classification needs at least 2, "
            "each holding the images of the class it is named after"
        )
    return rows, image_column, [name.replace("_", " ") for name in names]


def text_inputs(tokenizer, texts: Sequence[str], text_model_type: str) -> dict:
    """`input_ids` (and `attention_mask` where the tokenizer gives one) of `texts` as the text tower was
    trained on them: padded to `SIGLIP_TEXT_LENGTH` tokens for a SigLIP text tower, to the longest
    otherwise."""
    if "siglip" in text_model_type:
        padding = dict(padding="max_length", max_length=SIGLIP_TEXT_LENGTH)
    else:
        padding = dict(padding=True)
    encoded = tokenizer(list(texts), truncation=True, return_tensors="pt", **padding)
    return {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}


def _embedding(output) -> torch.Tensor:
    """The embeddings of `get_text_features` / `get_image_features`: transformers 5 returns an output whose
    `pooler_output` holds them, earlier versions the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.inference_mode()
def class_embeddings(zero_shot: ZeroShotModel, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """`(C, P)`: per class, the L2-normalised mean of the L2-normalised text embeddings of its prompts."""
    prompts = [template.format(name) for name in class_names for template in templates]
    device = zero_shot.model.device
    embeddings = []
    for start in range(0, len(prompts), TEXT_BATCH_SIZE):
        inputs = text_inputs(zero_shot.tokenizer, prompts[start : start + TEXT_BATCH_SIZE], zero_shot.text_model_type)
        output = zero_shot.model.get_text_features(**{key: value.to(device) for key, value in inputs.items()})
        embeddings.append(torch.nn.functional.normalize(_embedding(output).float(), dim=-1))
    per_prompt = torch.cat(embeddings).view(len(class_names), len(templates), -1)  # (C, T, P)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)  # (C, P)


@torch.inference_mode()
def zero_shot_logits(
    zero_shot: ZeroShotModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: "torch.device | str | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cosine similarities `(N, C)` of every image of `batches` (`(pixel_values (B, 3, S, S), labels
    (B,))`) with the class embeddings, and the labels `(N,)`, on the CPU. The model runs on `device`,
    accelerate's device (the accelerator when present) by default."""
    zero_shot.model.to(PartialState().device if device is None else device)
    classes = class_embeddings(zero_shot, class_names, templates)  # (C, P)
    logits, labels = [], []
    for pixel_values, batch_labels in batches:
        output = zero_shot.model.get_image_features(pixel_values=pixel_values.to(classes.device))
        images = torch.nn.functional.normalize(_embedding(output).float(), dim=-1)  # (B, P)
        logits.append((images @ classes.T).cpu())  # (B, C)
        labels.append(torch.as_tensor(batch_labels))
    if not logits:
        raise ValueError("no image of the folder could be read")
    return torch.cat(logits), torch.cat(labels)


def topk_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy in percent, and top-5 when there are 5 classes or more."""
    metrics = {"top1": 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()}
    if logits.shape[1] >= 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["top5"] = 100.0 * (top5 == labels[:, None]).any(dim=1).float().mean().item()
    return metrics


__all__ = [
    "DEFAULT_TEMPLATES",
    "SIGLIP_TEXT_LENGTH",
    "ZeroShotModel",
    "class_embeddings",
    "labelled_folder",
    "load_zero_shot_model",
    "text_inputs",
    "topk_accuracies",
    "zero_shot_logits",
]
