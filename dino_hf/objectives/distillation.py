"""Feature distillation from a frozen foundation model into any student (`--distill_from MODEL`).

The frozen model (DINOv2, DINOv3, any transformers or timm vision backbone) sees the same augmented view
as the student, read in its own normalisation. The student's pooled feature and patch tokens go through
their projectors (`dino_hf.models.distill_projector`) to the frozen model's width, and two terms score
them (LightlyTrain's `distillation`, its default method since 0.15):

- global (`distill_global`): the frozen model's L2-normalised global feature t and the student's
  projected, L2-normalised feature s are compared through their softmax distributions over a queue Q of
  past global features of the frozen model: KL(softmax(t Q^T / 0.07) || softmax(s Q^T / 0.07)), batch
  mean. The batch enters the queue before the loss.
- local (`distill_local`): per image, the patch-to-patch cosine similarity matrix of the frozen model's
  patch tokens against the student's (projected, resized bilinearly to the frozen model's grid), each
  row a softmax at temperature 0.07, KL frozen model -> student, mean over rows and images. With
  `--distill_local_loss cosine`, instead a direct regression of the patch features (AM-RADIO's:
  0.9 x (1 - cosine) + 0.1 x smooth-L1 per patch).

`Distillation` is a term of the step (`dino_hf.training.step`): it names its statistics and weights,
prepares the batch (mixup), computes its values from the student's projected outputs, and keeps its
state (the queue, and which frozen model it belongs to) for the checkpoint.
"""

import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from ..models.fingerprint import weights_sha256
from ..models.normalization import Normalization, normalization_of
from .term import StudentOutputs, Term

# LightlyTrain's temperature of both terms.
TEMPERATURE = 0.07
# Queue size by dataset size (LightlyTrain distillation v3): up to this many images, this many features.
QUEUE_SIZES = ((50, 16), (100, 32), (250, 64), (500, 128), (1000, 256), (2000, 512), (4000, 1024), (10000, 2048))
LARGEST_QUEUE = 8192
GLOBAL, LOCAL = "distill_global", "distill_local"
# AM-RADIO's mix of the patch regression: cosine and smooth-L1.
COSINE_SHARE = 0.9


def queue_size_for(num_images: int | None) -> int:
    """The queue's size for a dataset of `num_images` (LightlyTrain's table; 4096 up to 20k images, else
    8192, also when the size of a stream is unknown)."""
    if num_images is None:
        return LARGEST_QUEUE
    for limit, size in (*QUEUE_SIZES, (20000, 4096)):
        if num_images <= limit:
            return size
    return LARGEST_QUEUE


def queue_kl(
    teacher: torch.Tensor,
    student: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = TEMPERATURE,
    per_image: bool = False,
):
    """KL(softmax(t Q^T / T) || softmax(s Q^T / T)) averaged over the batch (`per_image`: each image's, `(B,)`).

    Args:
        teacher: `(B, D)` the frozen model's global features; student: `(B, D)` the projected student's.
            Both are L2-normalised here.
        queue: `(N, D)` past global features of the frozen model (L2-normalised; zero rows at the start).
    """
    t = F.normalize(teacher.float(), dim=-1)
    s = F.normalize(student.float(), dim=-1)
    queue = queue.float()
    log_p_teacher = F.log_softmax(t @ queue.T / temperature, dim=-1)  # (B, N)
    log_p_student = F.log_softmax(s @ queue.T / temperature, dim=-1)  # (B, N)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (B,)
    return kl if per_image else kl.mean()


def similarity_kl(
    teacher: torch.Tensor, student: torch.Tensor, temperature: float = TEMPERATURE, per_image: bool = False
) -> torch.Tensor:
    """Row-wise KL between the patch-to-patch similarity distributions of each image (`per_image`: the mean over
    each image's rows, `(B,)`).

    Args:
        teacher, student: `(B, N, D)` patch features on the same grid (L2-normalised here).

    Returns:
        KL(softmax(t_i . t_j / T)_j || softmax(s_i . s_j / T)_j), mean over the rows i and the images.
    """
    t = F.normalize(teacher.float(), dim=-1)
    s = F.normalize(student.float(), dim=-1)
    log_p_teacher = F.log_softmax(t @ t.transpose(1, 2) / temperature, dim=-1)  # (B, N, N)
    log_p_student = F.log_softmax(s @ s.transpose(1, 2) / temperature, dim=-1)  # (B, N, N)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (B, N)
    return kl.mean(-1) if per_image else kl.mean()


def cosine_regression(teacher: torch.Tensor, student: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """AM-RADIO's patch regression: per patch 0.9 x (1 - cos(s, t)) + 0.1 x smooth-L1(s, t), mean over patches
    and images (`per_image`: over each image's patches, `(B,)`). `teacher`, `student`: `(B, N, D)`."""
    teacher, student = teacher.float(), student.float()
    if per_image:
        cosine = F.cosine_similarity(student, teacher, dim=-1).mean(-1)  # (B,)
        smooth_l1 = F.smooth_l1_loss(student, teacher, reduction="none").mean(-1).mean(-1)  # (B,)
    else:
        cosine = F.cosine_similarity(student, teacher, dim=-1).mean()  # over (B, N)
        smooth_l1 = F.smooth_l1_loss(student, teacher, reduction="none").mean(-1).mean()
    return COSINE_SHARE * (1 - cosine) + (1 - COSINE_SHARE) * smooth_l1


def square_grid(patch_tokens: torch.Tensor, what: str) -> int:
    """The side of the square grid of `patch_tokens (B, P, C)` (square crops give square grids)."""
    side = math.isqrt(patch_tokens.shape[1])
    if side * side != patch_tokens.shape[1]:
        raise ValueError(
            f"{what} gives {patch_tokens.shape[1]} patch tokens, not a square grid; distillation needs square "
            "crops of a size that the model maps to a square grid of patches"
        )
    return side


def to_grid(patch_tokens: torch.Tensor, side: int) -> torch.Tensor:
    """`patch_tokens (B, h * w, D)` resized bilinearly to a `side` x `side` grid: `(B, side * side, D)`."""
    own = square_grid(patch_tokens, "the student")
    if own == side:
        return patch_tokens
    grid = patch_tokens.unflatten(1, (own, own)).permute(0, 3, 1, 2)  # (B, D, h, w)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(patch_tokens.dtype)  # (B, side * side, D)


class FrozenModel(nn.Module):
    """The model distilled from: frozen, in eval mode, without stochastic depth, never trained.

    It reads the student's crops converted on the device to its own normalisation, resized to
    `input_size` when one is given (so that its patch grid matches the student's), and runs under
    `torch.inference_mode` in the autocast of the caller (the run's mixed precision).

    Args:
        backbone: a `build_backbone` module (its `forward_tokens`, `image_mean` / `image_std`), built
            with `drop_path_rate=0`.
        name: what `--distill_from` named (for messages and the model card).
        student_normalization: the normalisation of the crops it is given.
        input_size: side it resizes the crops to (bilinear, antialiased); None keeps them as they are.
    """

    def __init__(
        self, backbone: nn.Module, name: str, student_normalization: Normalization, input_size: int | None = None
    ):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.name = name
        self.input_size = input_size
        own = normalization_of(backbone)
        student_mean, student_std = (torch.tensor(v).view(1, 3, 1, 1) for v in student_normalization)
        own_mean, own_std = (torch.tensor(v).view(1, 3, 1, 1) for v in own)
        # x_own = (x * std_s + mean_s - mean_own) / std_own = x * scale + shift
        self.register_buffer("scale", student_std / own_std, persistent=False)
        self.register_buffer("shift", (student_mean - own_mean) / own_std, persistent=False)
        self.converts = own != student_normalization
        self.num_features = backbone.num_features
        self.sha256 = weights_sha256(backbone)
        # An image-text model's image side: whether its global feature is the text-aligned embedding, and the
        # folder that holds its text tower (`dino_hf.models.text_aligned`).
        self.text_aligned = bool(getattr(backbone, "text_aligned", False))
        self.source = getattr(backbone, "source", None) or name

    def train(self, mode: bool = True) -> "FrozenModel":
        """Stays in eval mode whatever the run asks (no dropout, BatchNorm with its running statistics)."""
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values (B, 3, S, S)` in the student's normalisation -> global features `(B, D)` and patch
        tokens `(B, P, D)`, ordinary tensors (not inference tensors) without a gradient."""
        with torch.inference_mode():
            if self.converts:
                pixel_values = pixel_values * self.scale + self.shift
            if self.input_size is not None and pixel_values.shape[-1] != self.input_size:
                size = (self.input_size, self.input_size)
                pixel_values = F.interpolate(pixel_values, size=size, mode="bilinear", antialias=True)
            features, patch_tokens = self.backbone.forward_tokens(pixel_values)
        # Out of inference mode, so that the loss may save them for its backward.
        return features.clone(), patch_tokens.clone()


class FeatureQueue(nn.Module):
    """A ring of the last `size` global features of the frozen model (L2-normalised), zeros at the start.

    The write position is kept on the host (the batch sizes are known there) and mirrored in the
    `position` buffer for the checkpoint, so that a step reads nothing back from the device.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self._position = 0

    @torch.no_grad()
    def push_(self, rows: torch.Tensor) -> None:
        """Writes `rows (n, D)` after the last ones written (only the last `size` when n > size)."""
        size = len(self.features)
        if len(rows) > size:
            self._position = (self._position + len(rows) - size) % size
            rows = rows[-size:]
        index = (torch.arange(len(rows), device=rows.device) + self._position) % size
        self.features.index_copy_(0, index, rows.to(self.features.dtype))
        self._position = (self._position + len(rows)) % size
        self.position.fill_(self._position)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._position = int(self.position)  # once, at resume


class Distillation(Term):
    """The distillation term of the step (`dino_hf.objectives.term`): the frozen model, the queue, the weights
    and options. Its values are those of the first crop, the view that both networks see.

    Args:
        frozen: the `FrozenModel`.
        queue_size: features in the queue of the global term.
        global_weight, local_weight: the weights of `distill_global` and `distill_local` (0 turns a term
            off, without its work).
        local_loss: `"similarity"` (LightlyTrain v3) or `"cosine"` (AM-RADIO-style regression).
        mixup: mix each batch's views with a shuffled copy (one lambda ~ U(0, 1) per batch), as LightlyTrain.
    """

    def __init__(
        self,
        frozen: FrozenModel,
        queue_size: int,
        *,
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        local_loss: str = "similarity",
        mixup: bool = False,
    ):
        if local_loss not in ("similarity", "cosine"):
            raise ValueError(f"local_loss {local_loss!r} is unknown; use 'similarity' or 'cosine'")
        self.frozen = frozen
        self.queue = FeatureQueue(queue_size, frozen.num_features)
        self.weights = {name: w for name, w in ((GLOBAL, global_weight), (LOCAL, local_weight)) if w}
        self.local_loss = local_loss
        self.mixup = mixup

    @property
    def target_dim(self) -> int:
        return self.frozen.num_features

    def to(self, device) -> "Distillation":
        self.frozen.to(device)
        self.queue.to(device)
        return self

    def student_options(self) -> dict:
        return {"project": True}

    def prepare(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The view both networks see, the first crop: mixed with a shuffled copy of the batch when `mixup` is
        on (one share ~ U(0, 1) for the batch)."""
        if not self.mixup:
            return crops
        view = crops[0]
        share = torch.rand((), device=view.device)
        shuffled = view[torch.randperm(len(view), device=view.device)]
        return [share * view + (1 - share) * shuffled, *crops[1:]]

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        return self(outputs.crops[0], *outputs.projected, outputs.accelerator)

    def __call__(
        self,
        view: torch.Tensor,
        student_features: torch.Tensor,
        student_patches: torch.Tensor,
        accelerator: Accelerator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The active terms, before weighting, for the student's projected `student_features (B, D_t)` and
        `student_patches (B, P, D_t)` of `view (B, 3, S, S)`. The frozen model's global features of the
        batch (of every process) enter the queue first."""
        features, patches = self.frozen(view)  # (B, D_t), (B, P_t, D_t)
        values = {}
        if GLOBAL in self.weights:
            gathered = features if accelerator is None else accelerator.gather(features)  # the same queue everywhere
            self.queue.push_(F.normalize(gathered.float(), dim=-1))
            values[GLOBAL] = queue_kl(features, student_features, self.queue.features)
        if LOCAL in self.weights:
            student_patches = to_grid(student_patches, square_grid(patches, self.frozen.name))
            score = similarity_kl if self.local_loss == "similarity" else cosine_regression
            values[LOCAL] = score(patches, student_patches)
        return values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.queue.state_dict()

    def metadata(self) -> dict[str, str]:
        """What a checkpoint records of the frozen model (a resume is checked against it): its name and weight hash."""
        return {"distill_from": self.frozen.name, "sha256": self.frozen.sha256}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.queue.load_state_dict(state)


__all__ = [
    "Distillation",
    "FeatureQueue",
    "FrozenModel",
    "cosine_regression",
    "queue_kl",
    "queue_size_for",
    "similarity_kl",
]
