"""Distillation from several frozen models at once into one student (`--distill_from A B ...`), RADIO's way.

Each frozen model (a "teacher") sees the same augmented view, at its own size and in its own normalisation
(`FrozenModel`), in the same step. The student has one pair of heads per teacher
(`dino_hf.models.distill_projector.DistillHeads`): a summary head on its pooled feature and a feature head on its
patch tokens, built for that teacher's widths. Per teacher t and image i:

- summary (`distill_global/<t>`): `1 - cos(head(s_i), g_i)` with g_i the teacher's global feature (RADIO,
  `--distill_global_loss cosine`), or the queue KL of the single-teacher objective over a queue of the
  teacher's own global features (`queue_kl`);
- features (`distill_local/<t>`): the student's patch tokens through the feature head, resized to the teacher's
  grid, against the teacher's patch features after its balancing (`dino_hf.objectives.balancing`: PHI-S,
  per-dimension standardisation or none): `0.9 (1 - cos) + 0.1 smooth-L1` per patch (RADIO,
  `--distill_local_loss cosine`) or the patch-similarity KL.

The summary target is the teacher's own global feature, never balanced: the cosine does not see its scale, and
a text-aligned teacher's text tower then scores the summary head's output directly (the zero-shot export). The
balancing statistics are fitted on the first batches (`observe`, `fit`) before the first step.

With teacher dropping (UNIC, `dino_hf.objectives.teacher_dropping`), each image keeps the teacher with its
highest loss and drops each other one with a probability; every value is then its teacher's share of the mean
over the kept (image, teacher) pairs, times the number of teachers, so that with nothing dropped it is the
batch mean. Each teacher's values are logged under its name.
"""

import functools
import json
import re

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from .balancing import Balancing, Identity
from .distillation import (
    GLOBAL,
    LOCAL,
    FeatureQueue,
    FrozenModel,
    cosine_regression,
    queue_kl,
    similarity_kl,
    square_grid,
    to_grid,
)
from .teacher_dropping import teacher_keep_mask
from .term import StudentOutputs, Term


def teacher_names(specs: list[str]) -> list[str]:
    """Short names of the frozen models for logs and export folders: the last part of each path, Hub id or timm
    name (`facebook/dinov2-small` -> `dinov2-small`), made unique with a suffix where two share one."""
    names = []
    for spec in specs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", str(spec).rstrip("/").split("/")[-1].split(":")[-1]) or "teacher"
        name, index = base, 2
        while name in names:
            name, index = f"{base}-{index}", index + 1
        names.append(name)
    return names


class Teacher(nn.Module):
    """One frozen model of the run: what it sees (`frozen`), its name, its weight, the balancing of its patch
    features, and its widths (an image-text model's global feature may be narrower than its patch tokens).

    Args:
        frozen: the `FrozenModel` (its size and normalisation).
        name: its short name (`teacher_names`), in logs, checkpoints and export folders.
        weight: what its values are multiplied by (`--distill_weights`).
        balancing: a `Balancing` of its patch features' width, fitted before the first step.
        summary_dim, patch_dim: the widths of its global feature and of its patch features.
    """

    def __init__(
        self, frozen: FrozenModel, name: str, weight: float, balancing: Balancing, summary_dim: int, patch_dim: int
    ):
        super().__init__()
        self.frozen, self.name, self.weight, self.balancing = frozen, name, weight, balancing
        self.summary_dim, self.patch_dim = summary_dim, patch_dim
        if balancing.dim != patch_dim:
            raise ValueError(f"the balancing of {name} is {balancing.dim} wide; its patch features, {patch_dim}")
        if isinstance(balancing, Identity):  # nothing to fit: ready before the first batches
            balancing.observe(torch.zeros(2, patch_dim))
            balancing.fit()

    @property
    def text_aligned(self) -> bool:
        return self.frozen.text_aligned

    def describe(self) -> dict:
        """What the export and the checkpoint record of it."""
        return {
            "name": self.name,
            "source": self.frozen.name,
            "sha256": self.frozen.sha256,
            "weight": self.weight,
            "summary_dim": self.summary_dim,
            "patch_dim": self.patch_dim,
            "input_size": self.frozen.input_size,
            "text_aligned": self.text_aligned,
            "balancing": type(self.balancing).__name__,
        }


class MultiDistillation(Term):
    """The several-teacher distillation term of the step (`dino_hf.objectives.term`).

    Args:
        teachers: the `Teacher`s, in the order of `--distill_from` (and of the student's `DistillHeads`).
        global_weight, local_weight: the weights of the summary and feature terms (times each teacher's weight;
            0 turns a term off, without its work).
        global_loss: `"cosine"` (RADIO) or `"queue_kl"` (a queue of `queue_size` features per teacher).
        local_loss: `"cosine"` (RADIO's 0.9 cos + 0.1 smooth-L1) or `"similarity"` (the patch-similarity KL).
        drop_probability: teacher dropping's probability (0: every teacher is kept).
    """

    def __init__(
        self,
        teachers: list[Teacher],
        *,
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        global_loss: str = "cosine",
        local_loss: str = "cosine",
        queue_size: int = 4096,
        drop_probability: float = 0.0,
    ):
        if global_loss not in ("cosine", "queue_kl") or local_loss not in ("cosine", "similarity"):
            raise ValueError(
                f"losses {global_loss!r} / {local_loss!r}: use 'cosine' or 'queue_kl' for the summary, 'cosine' or "
                "'similarity' for the features"
            )
        self.teachers = nn.ModuleList(teachers)
        self.global_loss, self.local_loss = global_loss, local_loss
        self.drop_probability = drop_probability
        self.queues = nn.ModuleList(
            FeatureQueue(queue_size, teacher.summary_dim) if global_loss == "queue_kl" else nn.Identity()
            for teacher in teachers
        )
        self.weights = {}
        for teacher in teachers:
            for kind, weight in ((GLOBAL, global_weight), (LOCAL, local_weight)):
                if weight * teacher.weight:
                    self.weights[f"{kind}/{teacher.name}"] = weight * teacher.weight

    @property
    def fitted(self) -> bool:
        """Whether every teacher's balancing is fitted (with `"none"` from the start)."""
        return all(teacher.balancing._fitted for teacher in self.teachers)

    def to(self, device) -> "MultiDistillation":
        self.teachers.to(device)
        self.queues.to(device)
        return self

    def student_options(self) -> dict:
        return {"project": True}

    @torch.no_grad()
    def observe(self, view: torch.Tensor, accelerator: Accelerator | None = None) -> None:
        """The teachers' patch features of `view (B, 3, S, S)` (every process's, summed across them) into their
        balancing statistics."""
        reduce = None if accelerator is None else functools.partial(accelerator.reduce, reduction="sum")
        for teacher in self.teachers:
            _, patches = teacher.frozen(view)  # (B, P, C)
            teacher.balancing.observe(patches.flatten(0, 1), all_reduce=reduce)

    def fit(self) -> None:
        for teacher in self.teachers:
            if not teacher.balancing._fitted:
                teacher.balancing.fit()

    def values(self, outputs: StudentOutputs) -> dict[str, torch.Tensor]:
        return self(outputs.crops[0], outputs.projected, outputs.accelerator)

    def __call__(self, view: torch.Tensor, projected: tuple, accelerator: Accelerator | None = None) -> dict:
        """The active values, before weighting, for the student's per-teacher projected `(summary (B, D_t),
        patches (B, P, C_t))` of `view (B, 3, S, S)`."""
        per_image = {}  # name -> (B,)
        for teacher, queue, (summary, patches) in zip(self.teachers, self.queues, projected, strict=True):
            target_summary, target_patches = teacher.frozen(view)  # (B, D_t), (B, P_t, C_t)
            name = teacher.name
            if f"{GLOBAL}/{name}" in self.weights:
                per_image[f"{GLOBAL}/{name}"] = self._summary_loss(target_summary, summary, queue, accelerator)
            if f"{LOCAL}/{name}" in self.weights:
                target_patches = teacher.balancing(target_patches)
                patches = to_grid(patches, square_grid(target_patches, teacher.frozen.name))
                score = cosine_regression if self.local_loss == "cosine" else similarity_kl
                per_image[f"{LOCAL}/{name}"] = score(target_patches, patches, per_image=True)
        if not self.drop_probability:
            return {name: losses.mean() for name, losses in per_image.items()}
        return self._after_dropping(per_image)

    def _summary_loss(self, target, summary, queue, accelerator) -> torch.Tensor:
        """The summary term of each image, `(B,)`."""
        if self.global_loss == "cosine":
            return 1 - F.cosine_similarity(summary.float(), target.float(), dim=-1)
        gathered = target if accelerator is None else accelerator.gather(target)  # the same queue everywhere
        queue.push_(F.normalize(gathered.float(), dim=-1))
        return queue_kl(target, summary, queue.features, per_image=True)

    def _after_dropping(self, per_image: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each value as its teacher's share of the mean over the kept (image, teacher) pairs, times the number
        of teachers; the kept teachers are drawn from the per-image losses (detached), weighted."""
        names = [teacher.name for teacher in self.teachers]
        losses = torch.stack(
            [
                sum(self.weights[key] * per_image[key] for key in per_image if key.endswith(f"/{name}"))
                for name in names
            ],
            dim=1,
        ).detach()  # (B, T)
        keep = teacher_keep_mask(losses, self.drop_probability).to(losses.dtype)  # (B, T)
        scale = len(names) / keep.sum()
        column = {name: index for index, name in enumerate(names)}
        return {key: (keep[:, column[key.split("/", 1)[1]]] * value).sum() * scale for key, value in per_image.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The queues and the balancing statistics, by teacher name."""
        state = {}
        for teacher, queue in zip(self.teachers, self.queues):
            for key, value in teacher.balancing.state_dict().items():
                state[f"{teacher.name}.balancing.{key}"] = value
            for key, value in queue.state_dict().items():
                state[f"{teacher.name}.queue.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for teacher, queue in zip(self.teachers, self.queues):
            for prefix, module in (
                (f"{teacher.name}.balancing.", teacher.balancing),
                (f"{teacher.name}.queue.", queue),
            ):
                own = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
                if own or list(module.state_dict()):
                    module.load_state_dict(own)

    def metadata(self) -> dict[str, str]:
        """What a checkpoint records of its teachers (a resume is checked against it): their names, sources,
        weight hashes and weights, in order."""
        described = [
            {key: teacher.describe()[key] for key in ("name", "source", "sha256", "weight")}
            for teacher in self.teachers
        ]
        return {"teachers": json.dumps(described)}


__all__ = ["MultiDistillation", "Teacher", "teacher_names"]
