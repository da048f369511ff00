"""The reference's weighted k-NN classifier on frozen features (paper Sec. 3.2; reference eval_knn.py;
docs/evaluation.md#weighted-k-nn).

Features are L2-normalised, so that similarity is the cosine; each test feature takes the k nearest
train features (k = 10, 20, 100, 200) and their labels vote with weights exp(sim / 0.07). The test
set is processed in chunks, so that 1.28 M train features fit on one device.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from accelerate import PartialState

# Paper Sec. 3.2 / reference eval_knn.py: neighbours reported, and the temperature of the vote weights.
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07


# The figure that the k-NN guard of a run (`dino_hf.training.guard`) follows when the memory bank has
# 20 images or more (the paper's k).
GUARDED_FIGURE = "knn_top1@20"


def guarded_figure(knn: dict) -> str | None:
    """The key of the figure the guard follows in `knn`: `knn_top1@20`, else the first top-1 figure
    (a memory bank of fewer than 20 images); None when `knn` has no top-1 figure."""
    if GUARDED_FIGURE in knn:
        return GUARDED_FIGURE
    return next((key for key in knn if key.startswith("knn_top1@")), None)


def figure_name(key: str) -> str:
    """`knn_top1@20` -> `k-NN top-1 (k=20)`."""
    kind, k = key.removeprefix("knn_").split("@")
    return f"k-NN {kind.replace('top', 'top-')} (k={k})"


def nearest_neighbours(train_features, train_labels, test_features, k: int, chunk_size: int, device):
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


def knn_votes(similarity: torch.Tensor, neighbour_labels: torch.Tensor, k: int, num_classes: int, temperature: float):
    """Class scores (c, C): the one-hot labels of the k nearest neighbours, weighted exp(sim / T), summed
    (a scatter-add, the same sum as the reference's one-hot product)."""
    weights = (similarity[:, :k] / temperature).exp()  # (c, k)
    scores = torch.zeros(similarity.shape[0], num_classes, device=similarity.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)  # (c, C)


def knn_evaluate(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes: int | None = None,
    ks: Iterable[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 128,
    device=None,
) -> dict[str, float]:
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
    chunks = nearest_neighbours(train_features, train_labels, test_features, ks[-1], chunk_size, device)
    for similarity, neighbour_labels in chunks:
        targets = test_labels[start : start + similarity.shape[0]].to(device).view(-1, 1)  # (c, 1)
        start += similarity.shape[0]
        for k in ks:
            scores = knn_votes(similarity, neighbour_labels, k, num_classes, temperature)
            ranked = scores.sort(dim=1, descending=True, stable=True).indices  # (c, C)
            hits = ranked[:, : min(5, k, num_classes)] == targets  # (c, 5)
            correct[k][0] += hits[:, 0].sum().item()
            correct[k][1] += hits.sum().item()
    metrics = {}
    for k in ks:
        metrics[f"knn_top1@{k}"] = 100.0 * correct[k][0] / start
        metrics[f"knn_top5@{k}"] = 100.0 * correct[k][1] / start
    return metrics


__all__ = [
    "GUARDED_FIGURE",
    "KNN_KS",
    "KNN_TEMPERATURE",
    "figure_name",
    "guarded_figure",
    "knn_evaluate",
    "knn_votes",
    "nearest_neighbours",
]
