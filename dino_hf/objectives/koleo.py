"""DINOv2's KoLeo regulariser of the student's features (Oquab et al. 2023, Sec. 4), off by default."""

import torch
from torch.nn import functional as F

from .term import StudentOutputs, Term


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2019, "Spreading vectors for
    similarity search"; DINOv2 Sec. 4, `dinov2/loss/koleo_loss.py: KoLeoLoss`).

    With x_i the L2-normalised features and d_i = min_{j != i} ||x_i - x_j|| the distance to the
    nearest other feature of the batch, the loss is `-mean_i log(d_i + eps)`: it pushes each feature
    away from its nearest neighbour, spreading the batch over the sphere. Computed in float32 (float64
    for float64 features) with autocast off, as DINOv2 does; the nearest neighbours are chosen without
    gradient, the distances carry it.

    Args:
        features (`torch.Tensor` of shape `(B, D)`): the student's backbone features of one crop
            (DINOv2: the CLS token of one global crop), B >= 2.
        eps (`float`, defaults to 1e-8): keeps the normalisation and the log finite.

    Returns:
        The scalar loss (0-dim tensor).
    """
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(
            f"koleo_loss needs features (B, D) of at least 2 images to find nearest neighbours, got "
            f"{tuple(features.shape)}; use a per-device batch of 2 or more images"
        )
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.to(dtype), p=2, dim=-1, eps=eps)  # (B, D)
        with torch.no_grad():
            dots = x @ x.t()  # (B, B): for unit vectors ||x_i - x_j||^2 = 2 - 2 x_i.x_j
            dots.fill_diagonal_(-2.0)  # below every dot product of unit vectors: no image is its own neighbour
            nearest = dots.argmax(dim=1)  # (B,)
        distances = (x - x.index_select(0, nearest)).norm(dim=-1)  # (B,)
        return -torch.log(distances + eps).mean()


class KoLeoTerm(Term):
    """DINOv2's KoLeo regulariser of each global crop's backbone features, summed over the 2 crops."""

    def __init__(self, weight: float):
        self.weights = {"koleo": weight}

    def student_options(self) -> dict:
        return {"return_features": True}

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        global_features = outputs.features[: 2 * len(outputs.crops[0])]  # (2 * B, D), as DINOv2's CLS tokens
        return {"koleo": sum(koleo_loss(crop_features) for crop_features in global_features.chunk(2))}


__all__ = ["KoLeoTerm", "koleo_loss"]
