"""The reference's linear evaluation of a backbone: a linear classifier trained on frozen features
(paper Sec. 4.1 and Appendix; reference eval_linear.py).

`probe_features` is the probe's input (the CLS tokens of the last blocks, optionally with the mean
patch token), `train_linear_probe` trains a `LinearProbe` on it (SGD, cosine schedule, lr scaled by the
batch size) and `evaluate_linear_probe` measures its top-1 / top-5 accuracy. `cached_batches` serves
features computed once; `train_transform` is the augmentation for features computed every epoch.
`train_probe_epochs` is the training loop of this probe and of the dense one (`dino_hf.evaluation.dense`).
"""

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from torchvision import transforms

from ..models.normalization import IMAGENET, Normalization
from .feature_models import FeatureModel


def train_transform(image_size: int = 224, normalization: Normalization = IMAGENET) -> transforms.Compose:
    """The linear probe's training augmentation (reference eval_linear.py): RandomResizedCrop + flip, then
    normalised with `normalization` (the evaluated model's own, `FeatureModel.normalization`)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(normalization.mean, normalization.std),
        ]
    )


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


def probe_features(
    model: FeatureModel, pixel_values: torch.Tensor, n_last_blocks: int = 4, avgpool_patchtokens: bool = False
) -> torch.Tensor:
    """The linear probe's input (B, probe_feature_size): the CLS tokens of the last `n_last_blocks`
    blocks concatenated (ViT-S: 4), or with `avgpool_patchtokens` the last CLS and the mean patch token
    (ViT-B: n_last_blocks=1). CNNs give their pooled feature."""
    if not model.has_tokens:
        return model(pixel_values)
    if avgpool_patchtokens and n_last_blocks != 1:
        raise ValueError(
            f"avgpool_patchtokens pairs the last block's CLS with its mean patch token; "
            f"use n_last_blocks=1 (the reference's ViT-B setting), got {n_last_blocks}"
        )
    blocks = model.last_blocks(pixel_values, n_last_blocks)
    output = torch.cat([tokens[:, 0] for tokens in blocks], dim=-1)  # (B, n * D)
    if avgpool_patchtokens:
        mean_patch = blocks[-1][:, model.num_prefix_tokens :].mean(dim=1)  # (B, D)
        # Interleaved [cls_0, mean_0, cls_1, mean_1, ...] as the reference, so its probes load.
        output = torch.stack((output, mean_patch), dim=-1).reshape(output.shape[0], -1)  # (B, 2D)
    return output


def cached_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """`epoch -> batches` over cached features (N, F) and labels (N,), reshuffled every epoch."""

    def epoch_batches(epoch: int):
        order = torch.arange(len(labels))
        if shuffle:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield features[index], labels[index]

    return epoch_batches


def train_linear_probe(
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    num_features: int,
    num_labels: int,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 128,
    device=None,
    log: Callable[[int, float], None] | None = None,
) -> LinearProbe:
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

    def batch_loss(features, labels):
        return F.cross_entropy(probe(features.to(device)), labels.to(device))

    train_probe_epochs(probe, optimizer, scheduler, train_batches, epochs, batch_loss, log)
    return probe


def train_probe_epochs(
    probe: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    log: Callable[[int, float], None] | None = None,
) -> None:
    """The training loop of the probes (this one and `dino_hf.evaluation.dense`'s): per epoch, the probe
    in train mode, one optimiser step per batch of `train_batches(epoch)` on `batch_loss(inputs,
    targets)` (a batch whose loss is None is passed over), then one scheduler step and `log(epoch, mean
    loss)`."""
    for epoch in range(epochs):
        probe.train()
        total, count = 0.0, 0
        for inputs, targets in train_batches(epoch):
            loss = batch_loss(inputs, targets)
            if loss is None:
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        scheduler.step()
        if log is not None:
            log(epoch, total / max(count, 1))


@torch.inference_mode()
def evaluate_linear_probe(
    probe: LinearProbe, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device=None
) -> dict[str, float]:
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
    "LinearProbe",
    "cached_batches",
    "evaluate_linear_probe",
    "probe_feature_size",
    "probe_features",
    "train_linear_probe",
    "train_probe_epochs",
    "train_transform",
]
