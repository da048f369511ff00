"""Linear semantic segmentation on frozen patch tokens: the "linear" setting of DINOv2's semantic
segmentation evaluation (Oquab et al. 2023; its `BNHead` in dinov2/eval/segmentation and the ADE20K
linear configuration released with it).

`patch_features` is the probe's input: the last block's patch tokens after the final norm, the CLS and
register tokens dropped, on the patch grid. `LinearSegmentationProbe` is BatchNorm + a 1 x 1
convolution on it; `train_segmentation_probe` trains it with cross-entropy on logits upsampled
bilinearly to the mask, pixels of `IGNORE_INDEX` left out, and `evaluate_segmentation_probe` reports
the mIoU and pixel accuracy of `segmentation_metrics`. `SegmentationBatches` decodes and resizes the
image / mask pairs of `dino_hf.data.segmentation`.
"""

import itertools
from collections.abc import Callable, Iterable, Iterator

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import IterableDataset as TorchIterableDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data.decoding import decode_image
from ..data.segmentation import IGNORE_INDEX, decode_mask
from ..models.normalization import IMAGENET, Normalization
from .feature_models import FeatureModel
from .linear_probe import train_probe_epochs

# DINOv2's linear ADE20K head: AdamW, lr 1e-3, weight decay 1e-4, poly schedule (power 1).
DENSE_LR = 1e-3
DENSE_WEIGHT_DECAY = 1e-4


def require_patch_tokens(model: FeatureModel, what: str = "dense evaluation") -> None:
    """Refuse a backbone without patch tokens (a CNN gives one pooled feature per image)."""
    if not model.has_tokens:
        raise ValueError(
            f"{what} needs patch tokens; {type(model.model).__name__} is a backbone with only a pooled feature "
            "(a CNN). Pass a ViT: a DinoModel, a timm ViT, or a transformers ViT, Dinov2 or DINOv3 ViT folder"
        )


def segmentation_transform(image_size: int, flip: bool = False, normalization: Normalization = IMAGENET) -> Callable:
    """`(PIL image, mask (H, W) ints) -> (pixel_values (3, S, S), mask (S, S) int64)`: the short side
    resized to S (image bicubic, mask nearest), centre-cropped to S x S, with `flip` a random horizontal
    flip of both, then the image scaled to [0, 1] and normalised with `normalization` (the evaluated
    model's own, `FeatureModel.normalization`; ImageNet's by default).

    Unlike `eval_transform` there is no 256 / 224 margin: the whole short side is segmented."""
    steps = [v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(image_size)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(normalization.mean, normalization.std)]
    joint = v2.Compose(steps)  # v2 applies the geometry to the mask too, and the colour steps to the image only

    def transform(image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values, mask = joint(image, tv_tensors.Mask(torch.from_numpy(mask)))
        return pixel_values.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    return transform


class _SegmentationRows(TorchIterableDataset):
    """(pixel_values, mask) per row, or (None, None) for a pair that does not decode or whose sizes differ."""

    def __init__(self, rows: Iterable[dict], image_column: str, mask_column: str, transform: Callable):
        self.rows, self.image_column, self.mask_column, self.transform = rows, image_column, mask_column, transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        rows, worker = self.rows, get_worker_info()
        # A datasets.IterableDataset splits its shards between DataLoader workers by itself.
        if worker is not None and not isinstance(rows, datasets.IterableDataset):
            rows = itertools.islice(rows, worker.id, None, worker.num_workers)
        for row in rows:
            image, mask = decode_image(row[self.image_column]), decode_mask(row[self.mask_column])
            if image is None or mask is None or mask.shape != (image.height, image.width):
                yield None, None
            else:
                yield self.transform(image, mask)


def _collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    kept = [item for item in items if item[0] is not None]
    if not kept:
        return None, None, len(items)
    return torch.stack([pixels for pixels, _ in kept]), torch.stack([mask for _, mask in kept]), len(items) - len(kept)


class SegmentationBatches:
    """Batches `(pixel_values (B, 3, S, S), masks (B, S, S) int64)` of the image / mask pairs of `rows`
    (a datasets `Dataset` / `IterableDataset` or any iterable of dicts, columns as
    `dino_hf.data.segmentation.segmentation_rows` names them), through `transform`
    (`segmentation_transform`). Pairs that do not decode, whose mask is not single-channel or whose
    image and mask sizes differ are skipped and counted in `.skipped`."""

    def __init__(
        self, rows, image_column: str, mask_column: str, transform: Callable, batch_size: int, num_workers: int = 0
    ):
        self.loader = DataLoader(
            _SegmentationRows(rows, image_column, mask_column, transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for pixel_values, masks, skipped in self.loader:
            self.skipped += skipped
            if pixel_values is not None:
                yield pixel_values, masks


def patch_features(model: FeatureModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last block's patch tokens after the final norm on the patch grid: pixel_values (B, 3, H, W)
    -> (B, D, H / p, W / p); the CLS and register tokens (`num_prefix_tokens`) are dropped."""
    batch, _, height, width = pixel_values.shape
    grid = (height // model.patch_size, width // model.patch_size)
    tokens = model.last_blocks(pixel_values, 1)[-1][:, model.num_prefix_tokens :]  # (B, N, D)
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"{tokens.shape[1]} patch tokens for a {grid[0]} x {grid[1]} grid; check num_prefix_tokens "
            f"({model.num_prefix_tokens}) and that the image sides are multiples of the patch size {model.patch_size}"
        )
    return tokens.transpose(1, 2).reshape(batch, -1, *grid)  # (B, D, h, w)


def feature_batches(
    model: FeatureModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device=None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(patch_features (B, D, h, w), masks (B, S, S))` of every batch of images, without gradients."""
    device = PartialState().device if device is None else device
    model.to(device).eval()
    for pixel_values, masks in batches:
        with torch.no_grad():  # not around the yield: the probe's step needs gradients
            features = patch_features(model, pixel_values.to(device, non_blocking=True))
        yield features, masks


class LinearSegmentationProbe(nn.Module):
    """DINOv2's linear segmentation head (mmsegmentation's `BNHead` with one input): BatchNorm over the
    channels (optional), then a 1 x 1 convolution to the class logits, weight N(0, 0.01) and bias 0.

    `forward(features (B, D, h, w)) -> logits (B, num_labels, h, w)`."""

    def __init__(self, num_features: int, num_labels: int, batch_norm: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(num_features, num_labels, kernel_size=1)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


def upsampled_logits(probe: nn.Module, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The probe's logits resized bilinearly to the mask: (B, D, h, w) -> (B, num_labels, *size)."""
    return F.interpolate(probe(features), size=size, mode="bilinear", align_corners=False)


def train_segmentation_probe(
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    num_features: int,
    num_labels: int,
    epochs: int = 10,
    lr: float = DENSE_LR,
    optimizer_name: str = "adamw",
    batch_norm: bool = True,
    device=None,
    log: Callable[[int, float], None] | None = None,
) -> LinearSegmentationProbe:
    """Train a `LinearSegmentationProbe` as DINOv2's linear ADE20K evaluation: cross-entropy of the
    logits upsampled bilinearly to the mask, pixels of `IGNORE_INDEX` left out; AdamW (weight decay
    1e-4) or SGD (momentum 0.9, no weight decay) at `lr`, decayed linearly to 0 over the epochs
    (the poly schedule, power 1), stepped once per epoch.

    Args:
        train_batches: `epoch -> iterable of (features (B, D, h, w), masks (B, S, S))`; a batch with
            no labelled pixel is passed over.
        log: called with (epoch, mean loss) after every epoch.
    """
    device = PartialState().device if device is None else device
    probe = LinearSegmentationProbe(num_features, num_labels, batch_norm).to(device)
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=DENSE_WEIGHT_DECAY)
    elif optimizer_name == "sgd":
        optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    else:
        raise ValueError(f"the optimizer is 'adamw' or 'sgd', got {optimizer_name!r}")
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=1.0)

    def batch_loss(features, masks):
        masks = masks.to(device)
        if not (masks != IGNORE_INDEX).any():  # cross-entropy over no pixel is NaN
            return None
        logits = upsampled_logits(probe, features.to(device), masks.shape[-2:])
        return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)

    train_probe_epochs(probe, optimizer, scheduler, train_batches, epochs, batch_loss, log)
    return probe


def confusion_matrix(
    predictions: torch.Tensor, targets: torch.Tensor, num_labels: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """`(num_labels, num_labels)` int64 counts of pixels, row the true class and column the predicted
    one, over the pixels whose target is not `ignore_index`. predictions and targets: any shape, equal."""
    valid = targets != ignore_index
    targets, predictions = targets[valid].long(), predictions[valid].long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_labels):
        raise ValueError(
            f"a mask holds class id {int(targets.max())} (or a negative one) but there are {num_labels} classes; "
            f"pass --num_labels (class ids run from 0 to num_labels - 1, {ignore_index} is ignored)"
        )
    counts = torch.bincount(targets * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU and pixel accuracy (%) of a confusion matrix over a whole evaluation set (mmsegmentation's
    `mIoU` and `aAcc`).

    IoU of class c = TP / (TP + FP + FN) over all pixels; the mean is over the classes present in the
    ground truth or the predictions (TP + FP + FN > 0), classes absent from both are skipped (None in
    `iou_per_class`). Pixel accuracy is the fraction of labelled pixels predicted right.
    """
    confusion = confusion.double()
    if confusion.sum() == 0:
        raise ValueError("no labelled pixel to evaluate: every mask pixel is ignored or no mask was read")
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = true_positive / union.clamp(min=1)
    return {
        "miou": 100.0 * iou[present].mean().item(),
        "pixel_accuracy": 100.0 * (true_positive.sum() / confusion.sum()).item(),
        "iou_per_class": [100.0 * value if seen else None for value, seen in zip(iou.tolist(), present.tolist())],
    }


@torch.inference_mode()
def evaluate_segmentation_probe(
    probe: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_labels: int, device=None
) -> dict:
    """`segmentation_metrics` of `probe` on `(features (B, D, h, w), masks (B, S, S))` batches, the
    prediction being the argmax of the upsampled logits, plus the number of `images` and labelled `pixels`."""
    device = PartialState().device if device is None else device
    probe.to(device).eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=device)
    images = 0
    for features, masks in batches:
        masks = masks.to(device)
        predictions = upsampled_logits(probe, features.to(device), masks.shape[-2:]).argmax(dim=1)  # (B, S, S)
        confusion += confusion_matrix(predictions, masks, num_labels)
        images += len(masks)
    metrics = segmentation_metrics(confusion.cpu())
    return metrics | {"images": images, "pixels": int(confusion.sum())}


__all__ = [
    "DENSE_LR",
    "DENSE_WEIGHT_DECAY",
    "LinearSegmentationProbe",
    "SegmentationBatches",
    "confusion_matrix",
    "evaluate_segmentation_probe",
    "feature_batches",
    "patch_features",
    "require_patch_tokens",
    "segmentation_metrics",
    "segmentation_transform",
    "train_segmentation_probe",
]
