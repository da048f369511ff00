"""Downstream evaluation of DINO backbones (SPEC "Evaluation protocols"; paper Sec. 4.1 and Appendix).

- `load_feature_model(spec)`: any backbone dino_hf can read, behind one `FeatureModel` interface.
- `extract_features`: batched, gradient-free features on the accelerator when there is one.
- `knn_evaluate` / `knn_classify`: the reference's weighted k-NN (cosine similarity, k = 10, 20, 100,
  200, votes weighted exp(sim / 0.07)), chunked over the test set so 1.28 M train features fit.
- `LinearProbe` / `train_linear_probe`: the reference's linear evaluation on frozen features.

Attention maps are in `dino_hf.attention`, the feature dataset writer in `dino_hf.feature_export`.
"""

import abc
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
import timm
import torch
import torch.nn.functional as F
from accelerate import PartialState
from huggingface_hub import snapshot_download
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import IterableDataset as TorchIterableDataset
from torchvision import transforms

from .backbones import DinoModelBackbone, TimmBackbone, build_backbone
from .convert import dino_from_vit
from .data import decode_image, load_image_stream
from .modeling_dino import IMAGENET_MEAN, IMAGENET_STD, DinoModel

# Paper Sec. 4.1 / reference eval_knn.py: neighbours reported, and the temperature of the vote weights.
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
# Label columns looked for, in order, when the dataset has no ClassLabel column.
LABEL_COLUMNS = ("label", "labels", "class", "target")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # the trainer's checkpoint folders

# ---------------------------------------------------------------------------------------------------
# Backbones, as the evaluations see them


class FeatureModel(nn.Module, abc.ABC):
    """A backbone in eval mode. `forward(pixel_values (B, 3, H, W)) -> (B, num_features)` is the DINO feature
    (CLS token after the final LayerNorm for a ViT, pooled feature for a CNN).

    Attributes: `model` (the wrapped network), `num_features`, `has_tokens` (ViTs: `last_blocks` and
    `last_selfattention` work), `patch_size` and `num_prefix_tokens` (CLS and any register tokens).
    """

    has_tokens = True

    @abc.abstractmethod
    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        """Outputs of the last `n` blocks after the final LayerNorm: n tensors (B, P + N, D), oldest first."""

    @abc.abstractmethod
    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, P + N, P + N)."""


class DinoFeatureModel(FeatureModel):
    """A `DinoModel` (also what ViT folders and timm DINO folders are converted to)."""

    def __init__(self, model: DinoModel):
        super().__init__()
        self.model = model.eval()
        self.num_features = model.config.hidden_size
        self.patch_size = model.config.patch_size
        self.num_prefix_tokens = 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, return_dict=True).pooler_output  # (B, D)

    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        return self.model.get_intermediate_layers(pixel_values, n)

    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_last_selfattention(pixel_values)


class TimmFeatureModel(FeatureModel):
    """A timm model built with `num_classes=0`. ViTs (`VisionTransformer`) expose their tokens and
    attention; other models (CNNs) only their pooled feature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.num_features = getattr(model, "head_hidden_size", None) or model.num_features
        self.has_tokens = isinstance(model, timm.models.vision_transformer.VisionTransformer)
        self.patch_size = model.patch_embed.patch_size[0] if self.has_tokens else None
        self.num_prefix_tokens = model.num_prefix_tokens if self.has_tokens else 0

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)  # (B, D)

    def _require_tokens(self, what: str) -> None:
        if not self.has_tokens:
            raise ValueError(f"{what} needs a ViT's tokens; {type(self.model).__name__} only has a pooled feature")

    def last_blocks(self, pixel_values: torch.Tensor, n: int = 1) -> tuple[torch.Tensor, ...]:
        self._require_tokens("last_blocks")
        outputs = self.model.forward_intermediates(
            pixel_values, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )  # n pairs (patches (B, N, D), prefix (B, P, D))
        return tuple(torch.cat((prefix, patches), dim=1) for patches, prefix in outputs)

    def last_selfattention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Read the softmaxed weights as they enter the last block's attention dropout (the fused kernel
        never materialises them, so it is switched off for this call)."""
        self._require_tokens("last_selfattention")
        attention = self.model.blocks[-1].attn
        captured = []
        hook = attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        fused, attention.fused_attn = attention.fused_attn, False
        try:
            self.model.forward_features(pixel_values)
        finally:
            attention.fused_attn = fused
            hook.remove()
        return captured[0]  # (B, heads, P + N, P + N)


def load_feature_model(
    spec: "str | os.PathLike | nn.Module", image_size: int | None = None
) -> tuple[FeatureModel, Callable[[Image.Image], torch.Tensor]]:
    """The backbone named by `spec` in eval mode (frozen when read from disk), with DINO's evaluation
    transform. A model instance is used as it is: its parameters are left trainable or not.

    Args:
        spec: a folder written by `DinoModel.save_pretrained` or its Hub id; a transformers ViT folder
            or Hub id (converted to `DinoModel` with LayerNorm eps 1e-6, see `convert.dino_from_vit`);
            `"timm:NAME"` (timm's pretrained weights) or a timm folder (`config.json` with
            `architecture`); a training checkpoint `checkpoint-<step>/` (its `teacher_backbone/`) or a
            training output folder (its latest checkpoint); or a model instance (`DinoModel`, timm
            model, or a backbone of `build_backbone`).
        image_size: crop size of the transform; defaults to the model's native size.

    Returns:
        `(FeatureModel, transform)` where `transform(PIL image) -> (3, S, S)` is `eval_transform`.
    """
    if isinstance(spec, nn.Module):
        model = spec.model if isinstance(spec, (DinoModelBackbone, TimmBackbone)) else spec
    elif str(spec).startswith("timm:"):
        model = build_backbone(str(spec), pretrained=True, drop_path_rate=0.0).model.requires_grad_(False)
    else:
        folder = _model_folder(spec)
        config = json.loads((folder / "config.json").read_text())
        if "architecture" in config:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
        elif config.get("model_type") == "dino_vit":
            model = DinoModel.from_pretrained(folder, drop_path_rate=0.0)
        elif config.get("model_type") == "vit":
            model = dino_from_vit(folder)
        else:
            raise ValueError(
                f"{folder}/config.json has model_type {config.get('model_type')!r}; load_feature_model reads "
                "DinoModel ('dino_vit'), transformers ViT ('vit') and timm folders ('architecture')"
            )
        model.requires_grad_(False)  # read from disk: nothing of it is trained here
    if isinstance(model, DinoModel):
        feature_model = DinoFeatureModel(model)
        native_size = model.config.image_size
    else:
        feature_model = TimmFeatureModel(model)
        native_size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return feature_model, eval_transform(image_size or native_size)


def _model_folder(spec: "str | os.PathLike") -> Path:
    """Local folder holding the model's config.json: a checkpoint's teacher, a run's latest checkpoint,
    or a Hub snapshot."""
    folder = Path(spec)
    if not folder.is_dir():
        parts = str(spec).split("/")
        if len(parts) != 2 or not all(parts) or str(spec).startswith((".", "~")):
            raise ValueError(f"{spec} is neither a folder nor a Hub id 'org/name'; check the path")
        return Path(snapshot_download(str(spec)))
    if (folder / "teacher_backbone").is_dir():
        return folder / "teacher_backbone"
    if not (folder / "config.json").is_file():
        steps = {int(match[1]): path for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))}
        checkpoints = [steps[step] for step in sorted(steps)]
        if checkpoints and (checkpoints[-1] / "teacher_backbone").is_dir():
            return checkpoints[-1] / "teacher_backbone"
        raise ValueError(
            f"{folder} has no config.json, no teacher_backbone/ and no checkpoint-<step>/teacher_backbone/; "
            "pass a model folder, a training checkpoint folder or a training output folder"
        )
    return folder


# ---------------------------------------------------------------------------------------------------
# Images in, features out


def eval_transform(image_size: int = 224) -> transforms.Compose:
    """DINO's evaluation transform: resize the short side to 256 (bicubic), centre-crop 224, ImageNet
    normalisation; other sizes keep the 256 / 224 ratio. PIL image -> (3, S, S)."""
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(image_size: int = 224) -> transforms.Compose:
    """The linear probe's training augmentation (reference eval_linear.py): RandomResizedCrop + flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class _DecodedRows(TorchIterableDataset):
    """(pixel_values (3, S, S) or None, label or row) per row; None marks an image that did not decode."""

    def __init__(self, rows: Iterable[dict], image_column: str, transform: Callable, label_column: str | None):
        self.rows, self.image_column, self.transform, self.label_column = rows, image_column, transform, label_column

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, object]]:
        rows, worker = self.rows, get_worker_info()
        # A datasets.IterableDataset splits its shards between DataLoader workers by itself.
        if worker is not None and not isinstance(rows, datasets.IterableDataset):
            rows = itertools.islice(rows, worker.id, None, worker.num_workers)
        for row in rows:
            image = decode_image(row[self.image_column])
            target = row if self.label_column is None else row[self.label_column]
            yield (None if image is None or target is None else self.transform(image)), target


def _collate(items: list) -> tuple[torch.Tensor | None, list, int]:
    kept = [(pixels, target) for pixels, target in items if pixels is not None]
    pixels = torch.stack([pixels for pixels, _ in kept]) if kept else None
    return pixels, [target for _, target in kept], len(items) - len(kept)


class ImageBatches:
    """Batches of `(pixel_values (B, 3, S, S), labels (B,))` from rows of a dataset (a datasets
    `Dataset` / `IterableDataset` or any iterable of dicts), or `(pixel_values, rows)` when
    `label_column` is None. Rows whose image does not decode (or whose label is missing) are skipped
    and counted in `.skipped`.

    Args:
        label_ids: shared between the splits of one evaluation, maps string labels to class ids in
            order of first appearance; integer labels are used as they are.
        num_workers: DataLoader processes that decode and transform images.
    """

    def __init__(self, rows, image_column: str, transform: Callable, batch_size: int,
                 label_column: str | None = None, num_workers: int = 0, label_ids: dict | None = None):
        self.loader = DataLoader(
            _DecodedRows(rows, image_column, transform, label_column),
            batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        )
        self.label_column = label_column
        self.label_ids = {} if label_ids is None else label_ids
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, "torch.Tensor | list[dict]"]]:
        for pixel_values, targets, skipped in self.loader:
            self.skipped += skipped
            if pixel_values is None:
                continue
            if self.label_column is None:
                yield pixel_values, targets
            else:
                yield pixel_values, torch.tensor([self._label_id(label) for label in targets], dtype=torch.long)

    def _label_id(self, label) -> int:
        if isinstance(label, str):
            return self.label_ids.setdefault(label, len(self.label_ids))
        return int(label)


def add_model_argument(parser) -> None:
    """The `--model` option of the evaluation scripts (anything `load_feature_model` reads)."""
    parser.add_argument("--model", required=True,
                        help="DinoModel folder or Hub id, transformers ViT folder, timm:NAME or timm folder, "
                             "or a training checkpoint (its teacher).")


def add_dataset_arguments(parser, labelled: bool = True) -> None:
    """Command-line options that name the data of an evaluation script (train and eval splits)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", help="Hub dataset id or a local dataset folder.")
    group.add_argument("--dataset_config_name", help="Configuration of the dataset.")
    group.add_argument("--train_dir", help="Image folder (class sub-folders give the labels) for the train split.")
    group.add_argument("--train_files", nargs="+",
                       help="Data files (parquet, arrow, webdataset .tar) of the train split.")
    group.add_argument("--train_split", default="train", help="Split of --dataset_name used as the train set.")
    group.add_argument("--image_column_name", help="Image column (found automatically).")
    group.add_argument("--no_streaming", dest="streaming", action="store_false",
                       help="Download the dataset instead of streaming it.")
    if labelled:
        group.add_argument("--eval_dir", help="Image folder (class sub-folders) for the eval split.")
        group.add_argument("--eval_files", nargs="+", help="Data files of the eval split.")
        group.add_argument("--eval_split", default="validation", help="Split of --dataset_name used as the eval set.")
        group.add_argument("--label_column_name",
                           help="Label column (found automatically: label, labels, class, target).")


def load_split(args, which: str = "train") -> tuple[object, str, str | None]:
    """`(rows, image_column, label_column)` of the `which` ("train" or "eval") split named by the options
    of `add_dataset_arguments`; label_column is None for unlabelled parsers."""
    folder, files = getattr(args, f"{which}_dir", None), getattr(args, f"{which}_files", None)
    if folder or files:
        source = dict(train_dir=folder, data_files=files)
    else:
        split = getattr(args, f"{which}_split")
        source = dict(dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, split=split)
    if not any(source.values()):
        raise ValueError(f"no data for the {which} split: pass --dataset_name, --{which}_dir or --{which}_files")
    rows, image_column = load_image_stream(image_column_name=args.image_column_name, streaming=args.streaming, **source)
    if not hasattr(args, "label_column_name"):
        return rows, image_column, None
    return rows, image_column, find_label_column(rows, args.label_column_name)


def find_label_column(rows, name: str | None = None) -> str:
    """`name`, else the dataset's ClassLabel column, else the first of `LABEL_COLUMNS` it has."""
    features = getattr(rows, "features", None) or {}
    columns = list(features) or list(getattr(rows, "column_names", None) or [])
    if name is not None:
        if columns and name not in columns:
            raise ValueError(f"label column {name!r} not found; the dataset has {columns}")
        return name
    for column, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return column
    for column in LABEL_COLUMNS:
        if column in columns:
            return column
    raise ValueError(f"no label column among {columns}; name it with --label_column_name")


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: "torch.device | str | None" = None,
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every batch `(pixel_values (B, 3, H, W), labels (B,))`, without gradients.

    Args:
        device: where the model runs; defaults to accelerate's device (the accelerator when present).
        feature_fn: `feature_fn(model, pixel_values) -> (B, D)`; defaults to `model(pixel_values)`.

    Returns:
        features (N, D) float32 and labels (N,), both on the CPU.
    """
    device = PartialState().device if device is None else torch.device(device)
    model.to(device).eval()
    features, labels = [], []
    for pixel_values, batch_labels in batches:
        pixel_values = pixel_values.to(device, non_blocking=True)
        output = model(pixel_values) if feature_fn is None else feature_fn(model, pixel_values)
        features.append(output.float().cpu())
        labels.append(torch.as_tensor(batch_labels))
    if not features:
        raise ValueError("no image could be read from the dataset; check the image column and the split")
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------
# Weighted k-NN (reference eval_knn.py, knn_classifier)


def _knn_chunks(train_features, train_labels, test_features, k: int, chunk_size: int, device):
    """Per chunk of test features: similarities of the k nearest train features (c, k), sorted
    descending, and their labels (c, k). Features are L2-normalised here, so cosine = dot product."""
    if k > train_features.shape[0]:
        raise ValueError(f"k={k} is larger than the {train_features.shape[0]} train features; use a smaller k")
    train = F.normalize(train_features.to(device, torch.float32), dim=1)  # (N_train, D)
    train_labels = train_labels.to(device)
    for start in range(0, test_features.shape[0], chunk_size):
        chunk = F.normalize(test_features[start : start + chunk_size].to(device, torch.float32), dim=1)  # (c, D)
        similarity, indices = (chunk @ train.T).topk(k, dim=1, largest=True, sorted=True)  # (c, k)
        yield similarity, train_labels[indices]


def _knn_scores(similarity: torch.Tensor, neighbour_labels: torch.Tensor, k: int, num_classes: int, temperature: float):
    """Class scores (c, C): the one-hot labels of the k nearest neighbours, weighted exp(sim / T), summed
    (a scatter-add, the same sum as the reference's one-hot product)."""
    weights = (similarity[:, :k] / temperature).exp()  # (c, k)
    scores = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)  # (c, C)


def knn_class_scores(train_features, train_labels, test_features, num_classes: int, k: int = 20,
                     temperature: float = KNN_TEMPERATURE, chunk_size: int = 128, device=None) -> torch.Tensor:
    """Weighted k-NN votes per class: train (N, D), labels (N,), test (Q, D) -> scores (Q, C) on the CPU."""
    device = PartialState().device if device is None else device
    chunks = _knn_chunks(train_features, train_labels, test_features, k, chunk_size, device)
    return torch.cat([_knn_scores(sim, labels, k, num_classes, temperature).cpu() for sim, labels in chunks])


def knn_evaluate(train_features, train_labels, test_features, test_labels, num_classes: int | None = None,
                 ks: Iterable[int] = KNN_KS, temperature: float = KNN_TEMPERATURE, chunk_size: int = 128,
                 device=None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN for every k in `ks`, in one pass over the test set.

    Args:
        train_features (N, D), train_labels (N,), test_features (Q, D), test_labels (Q,): features need
            not be normalised. `num_classes` defaults to the largest label + 1.
        chunk_size: test features per similarity matrix (chunk_size x N floats on the device).

    Returns:
        `{"knn_top1@k": ..., "knn_top5@k": ...}` for each k. Top-5 counts the first min(5, k) classes
        as the reference; ties between classes go to the lower class id.
    """
    ks = sorted(set(ks))
    device = PartialState().device if device is None else device
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = {k: [0, 0] for k in ks}
    start = 0
    chunks = _knn_chunks(train_features, train_labels, test_features, ks[-1], chunk_size, device)
    for similarity, neighbour_labels in chunks:
        targets = test_labels[start : start + similarity.shape[0]].to(device).view(-1, 1)  # (c, 1)
        start += similarity.shape[0]
        for k in ks:
            scores = _knn_scores(similarity, neighbour_labels, k, num_classes, temperature)
            ranked = scores.sort(dim=1, descending=True, stable=True).indices  # (c, C)
            hits = ranked[:, : min(5, k, num_classes)] == targets  # (c, 5)
            correct[k][0] += hits[:, 0].sum().item()
            correct[k][1] += hits.sum().item()
    metrics = {}
    for k in ks:
        metrics[f"knn_top1@{k}"] = 100.0 * correct[k][0] / start
        metrics[f"knn_top5@{k}"] = 100.0 * correct[k][1] / start
    return metrics


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, sources: tuple[dict, dict], image_size: int, *,
                 image_column_name: str | None = None, label_column_name: str | None = None,
                 device=None) -> dict[str, float]:
    """`knn_evaluate` of `backbone`'s features on two labelled sources (memory bank, queries), each a
    dict of `load_image_stream` arguments; k = 10, 20, 100, 200 where the bank is large enough.
    The backbone's train / eval mode is restored afterwards (it is evaluated during training)."""
    was_training = backbone.training
    model, _ = load_feature_model(backbone)
    transform = eval_transform(image_size)
    label_ids: dict = {}
    features = []
    for source in sources:
        rows, image_column = load_image_stream(**source, image_column_name=image_column_name)
        label_column = find_label_column(rows, label_column_name)
        batches = ImageBatches(rows, image_column, transform, batch_size=64, label_column=label_column,
                               label_ids=label_ids)
        features.append(extract_features(model, batches, device))
    backbone.train(was_training)
    (train_x, train_y), (test_x, test_y) = features
    ks = tuple(k for k in KNN_KS if k <= len(train_y))
    return knn_evaluate(train_x, train_y, test_x, test_y, ks=ks, device=device)


def knn_classify(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 20,
                 temperature: float = KNN_TEMPERATURE, chunk_size: int = 128, device=None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of the weighted k-NN with one k (reference `knn_classifier`)."""
    metrics = knn_evaluate(train_features, train_labels, test_features, test_labels, num_classes, (k,),
                           temperature, chunk_size, device)
    return metrics[f"knn_top1@{k}"], metrics[f"knn_top5@{k}"]


# ---------------------------------------------------------------------------------------------------
# Linear probe (reference eval_linear.py)


class LinearProbe(nn.Module):
    """A linear classifier on frozen features: weight N(0, 0.01), bias 0 (reference `LinearClassifier`).

    `forward(features (B, num_features)) -> logits (B, num_labels)`."""

    def __init__(self, num_features: int, num_labels: int = 1000):
        super().__init__()
        self.linear = nn.Linear(num_features, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


def probe_feature_size(model: FeatureModel, n_last_blocks: int = 4, avgpool_patchtokens: bool = False) -> int:
    """Width of `probe_features`: D x (n_last_blocks + avgpool) for a ViT, D for a CNN."""
    if not model.has_tokens:
        return model.num_features
    return model.num_features * (n_last_blocks + int(avgpool_patchtokens))


def probe_features(model: FeatureModel, pixel_values: torch.Tensor, n_last_blocks: int = 4,
                   avgpool_patchtokens: bool = False) -> torch.Tensor:
    """The linear probe's input (B, probe_feature_size): the CLS tokens of the last `n_last_blocks`
    blocks concatenated (ViT-S: 4), or with `avgpool_patchtokens` the last CLS and the mean patch token
    (ViT-B: n_last_blocks=1). CNNs give their pooled feature."""
    if not model.has_tokens:
        return model(pixel_values)
    if avgpool_patchtokens and n_last_blocks != 1:
        raise ValueError(f"avgpool_patchtokens pairs the last block's CLS with its mean patch token; "
                         f"use n_last_blocks=1 (the reference's ViT-B setting), got {n_last_blocks}")
    blocks = model.last_blocks(pixel_values, n_last_blocks)
    output = torch.cat([tokens[:, 0] for tokens in blocks], dim=-1)  # (B, n * D)
    if avgpool_patchtokens:
        mean_patch = blocks[-1][:, model.num_prefix_tokens :].mean(dim=1)  # (B, D)
        # Interleaved [cls_0, mean_0, cls_1, mean_1, ...] as the reference, so its probes load.
        output = torch.stack((output, mean_patch), dim=-1).reshape(output.shape[0], -1)  # (B, 2D)
    return output


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True,
                   seed: int = 0) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """`epoch -> batches` over cached features (N, F) and labels (N,), reshuffled every epoch."""

    def epoch_batches(epoch: int):
        order = torch.arange(len(labels))
        if shuffle:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield features[index], labels[index]

    return epoch_batches


def train_linear_probe(train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                       num_features: int, num_labels: int, epochs: int = 100, lr: float = 0.001,
                       batch_size: int = 128, device=None,
                       log: Callable[[int, float], None] | None = None) -> LinearProbe:
    """Train a `LinearProbe` as the reference: SGD momentum 0.9, weight decay 0, lr `lr * batch_size / 256`,
    cosine annealing to 0 over `epochs`, stepped once per epoch; cross-entropy loss.

    Args:
        train_batches: `epoch -> iterable of (features (B, num_features), labels (B,))`, e.g.
            `cached_batches(...)`, or features computed on augmented images every epoch.
        batch_size: the total batch size of `train_batches`, for the learning-rate scaling rule.
        log: called with (epoch, mean loss) after every epoch.
    """
    device = PartialState().device if device is None else device
    probe = LinearProbe(num_features, num_labels).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr * batch_size / 256.0, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    for epoch in range(epochs):
        probe.train()
        total, count = 0.0, 0
        for features, labels in train_batches(epoch):
            loss = F.cross_entropy(probe(features.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        scheduler.step()
        if log is not None:
            log(epoch, total / max(count, 1))
    return probe


@torch.inference_mode()
def evaluate_linear_probe(probe: LinearProbe, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                          device=None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of `probe` on `(features, labels)` batches: `{"top1": ..., "top5": ...}`."""
    device = PartialState().device if device is None else device
    probe.to(device).eval()
    top1 = top5 = total = 0
    for features, labels in batches:
        logits = probe(features.to(device))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = ranked == labels.to(device).view(-1, 1)
        top1, top5, total = top1 + hits[:, 0].sum().item(), top5 + hits.sum().item(), total + len(labels)
    return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


__all__ = [
    "DinoFeatureModel",
    "FeatureModel",
    "ImageBatches",
    "KNN_KS",
    "KNN_TEMPERATURE",
    "LABEL_COLUMNS",
    "LinearProbe",
    "TimmFeatureModel",
    "add_dataset_arguments",
    "add_model_argument",
    "knn_accuracy",
    "cached_batches",
    "eval_transform",
    "evaluate_linear_probe",
    "extract_features",
    "find_label_column",
    "knn_class_scores",
    "knn_classify",
    "knn_evaluate",
    "load_feature_model",
    "load_split",
    "probe_feature_size",
    "probe_features",
    "train_linear_probe",
    "train_transform",
]
