"""Downstream evaluation of DINO backbones (docs/evaluation.md; paper Sec. 3.2 and Appendix):
labelled images in, features out.

- `add_model_argument` / `add_dataset_arguments` / `load_split`: the model and the train and eval
  splits of the evaluation scripts, from the command line.
- `ImageBatches`: batches of decoded, transformed images and their class ids; bad images are skipped.
- `extract_features`: batched, gradient-free features on the accelerator when there is one.
- `knn_accuracy`: the k-NN accuracy of a backbone on two labelled sources, as measured during training.

The backbones are read by `dino_hf.evaluation.feature_models`, the classifiers are in `dino_hf.evaluation.knn` and
`dino_hf.evaluation.linear_probe`, attention maps in `dino_hf.evaluation.attention` and the feature dataset writer in
`dino_hf.evaluation.feature_export`.
"""

import itertools
from collections.abc import Callable, Iterable, Iterator

import datasets
import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import IterableDataset as TorchIterableDataset

from ..data.decoding import decode_image
from ..data.sources import load_image_stream
from ..models.normalization import normalization_of
from .feature_models import eval_transform, load_feature_model
from .knn import KNN_KS, knn_evaluate

# Label columns looked for, in order, when the dataset has no ClassLabel column.
LABEL_COLUMNS = ("label", "labels", "class", "target")


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

    def __init__(
        self,
        rows,
        image_column: str,
        transform: Callable,
        batch_size: int,
        label_column: str | None = None,
        num_workers: int = 0,
        label_ids: dict | None = None,
    ):
        self.loader = DataLoader(
            _DecodedRows(rows, image_column, transform, label_column),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
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


@torch.no_grad()
def knn_accuracy(
    backbone: nn.Module,
    sources: tuple[dict, dict],
    image_size: int,
    *,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    device=None,
) -> dict[str, float]:
    """`knn_evaluate` of `backbone`'s features on two labelled sources (memory bank, queries), each a
    dict of `load_image_stream` arguments; k = 10, 20, 100, 200 where the bank is large enough.
    Images are normalised with the backbone's own mean and std (`normalization_of`: those of the weights
    its run started from, as its training crops). The backbone's train / eval mode is restored afterwards
    (it is evaluated during training)."""
    was_training = backbone.training
    model, _ = load_feature_model(backbone)
    transform = eval_transform(image_size, normalization_of(backbone))
    label_ids: dict = {}
    features = []
    for source in sources:
        rows, image_column = load_image_stream(**source, image_column_name=image_column_name)
        label_column = find_label_column(rows, label_column_name)
        batches = ImageBatches(
            rows, image_column, transform, batch_size=64, label_column=label_column, label_ids=label_ids
        )
        features.append(extract_features(model, batches, device))
    backbone.train(was_training)
    (train_x, train_y), (test_x, test_y) = features
    ks = tuple(k for k in KNN_KS if k <= len(train_y))
    return knn_evaluate(train_x, train_y, test_x, test_y, ks=ks, device=device)


__all__ = [
    "ImageBatches",
    "LABEL_COLUMNS",
    "extract_features",
    "find_label_column",
    "knn_accuracy",
]
