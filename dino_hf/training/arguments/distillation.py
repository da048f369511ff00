"""The distillation settings of a run (a frozen model taught to the student), and their checks."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ...models.configuration_dino import PRESETS
from ...models.references import TIMM_PREFIX, is_hub_id, missing_local_path
from ...models.transformers_backbone import accepted_models_text, check_vision_config
from .checks import fail
from .model import check_timm_name

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class DistillationArguments:
    """Distillation from a frozen model (docs/distillation.md)."""

    distill_from: list[str] | None = field(
        default=None,
        metadata={
            "help": "Distil these frozen models (one or several teachers) into the student: anything "
            "--model_name_or_path takes (a transformers vision folder or Hub id, timm:NAME with its trained weights, "
            "a timm or DinoModel folder, an export of dino_hf), and the image side of CLIP, SigLIP, SigLIP 2, "
            "MetaCLIP 2, AIMv2 or RADIO folders. Never trained nor saved in checkpoints (their names and weight "
            "hashes are). Unset: off."
        },
    )
    distill_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per --distill_from model, multiplying its terms. Unset: 1 each."},
    )
    dino_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the DINO loss. 0 (the distillation recipe) trains the student on the distillation "
            "terms alone: no EMA teacher forward, no head, one view per image."
        },
    )
    distill_global_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the global term: KL of the softmax over a queue of the frozen model's features."},
    )
    distill_local_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the local term on the patch tokens (--distill_local_loss); 0 turns it off."},
    )
    distill_local_loss: Literal["similarity", "cosine"] = field(
        default="similarity",
        metadata={
            "help": "similarity: KL of each image's patch-to-patch similarity rows (LightlyTrain); cosine: direct "
            "regression of the frozen model's patch features (0.9 cosine + 0.1 smooth-L1, AM-RADIO style)."
        },
    )
    distill_projector: Literal["linear", "mlp"] = field(
        default="linear",
        metadata={
            "help": "The student's projectors to the frozen model's width: linear, or mlp (Linear, LayerNorm, "
            "GELU, Linear). Dropped at export."
        },
    )
    distill_queue_size: int | None = field(
        default=None,
        metadata={"help": "Features in the global term's queue. Unset: by the dataset size (16 to 8192)."},
    )
    distill_mixup: bool = field(
        default=False,
        metadata={"help": "Mix each batch's views with a shuffled copy, one U(0, 1) weight per batch (LightlyTrain)."},
    )
    distill_teacher_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "Resize the view for the frozen model to this side, e.g. 196 for a patch-14 model beside a "
            "patch-16 student at 224, so that the patch grids match 1:1; one side for every teacher, or one per "
            "--distill_from model. Unset: the view's own size."
        },
    )
    distill_global_loss: Literal["queue_kl", "cosine"] = field(
        default="queue_kl",
        metadata={
            "help": "The global term: queue_kl (KL over a queue of the frozen model's features, LightlyTrain) or "
            "cosine (1 - cosine of the summary head's output and the frozen model's global feature, RADIO)."
        },
    )
    distill_balancing: Literal["none", "standardize", "phi_s"] = field(
        default="none",
        metadata={
            "help": "How each frozen model's patch features are balanced before the local term: none, standardize "
            "(per dimension) or phi_s (PHI-S: rotated so that every dimension has variance 1, RADIO). The "
            "statistics are fitted on the first --distill_balancing_batches batches and kept in checkpoints."
        },
    )
    distill_balancing_batches: int = field(
        default=8,
        metadata={"help": "Batches whose frozen-model features fit the balancing statistics before the first step."},
    )
    distill_teacher_drop: float = field(
        default=0.0,
        metadata={
            "help": "Teacher dropping (UNIC): per image, the teacher with the highest loss is kept and every other "
            "one is dropped with this probability (0.5 in UNIC); 0 keeps every teacher."
        },
    )
    distill_zero_shot: bool = field(
        default=False,
        metadata={
            "help": "Export OUTPUT_DIR/student_zero_shot: the student with its summary head for the first CLIP "
            "model among --distill_from (a folder or Hub id with its text tower), and that model's text tower, as "
            "a transformers dual encoder for pipeline('zero-shot-image-classification')."
        },
    )
    distill_ema_student: bool = field(
        default=False,
        metadata={
            "help": "Export an EMA of the student (momentum from --momentum_teacher to 1), as DINOv2 and DINOv3's "
            "distillations do, instead of the student itself."
        },
    )


# The distillation options and their defaults: set without --distill_from, they would do nothing.
_DISTILL_DEFAULTS = {
    "distill_global_weight": 1.0,
    "distill_local_weight": 1.0,
    "distill_local_loss": "similarity",
    "distill_projector": "linear",
    "distill_queue_size": None,
    "distill_mixup": False,
    "distill_teacher_size": None,
    "distill_ema_student": False,
    "distill_weights": None,
    "distill_global_loss": "queue_kl",
    "distill_balancing": "none",
    "distill_balancing_batches": 8,
    "distill_teacher_drop": 0.0,
    "distill_zero_shot": False,
}


def distilling(args: "DinoTrainingArguments") -> bool:
    """Whether the run distils a frozen model (`--distill_from`)."""
    return args.distill_from is not None


def teacher_sizes(args: "DinoTrainingArguments") -> list[int | None]:
    """The side each `--distill_from` model sees the view at (None: the view's own size)."""
    sizes = args.distill_teacher_size or [None]
    return sizes * len(args.distill_from) if len(sizes) == 1 else list(sizes)


def teacher_weights(args: "DinoTrainingArguments") -> list[float]:
    """The weight of each `--distill_from` model (1 each unless `--distill_weights`)."""
    return list(args.distill_weights) if args.distill_weights else [1.0] * len(args.distill_from)


def several_teachers(args: "DinoTrainingArguments") -> bool:
    """Whether the run takes the several-teacher objective (`dino_hf.objectives.multi_distillation`): more than
    one frozen model, or an option only it has (the cosine global term, balancing, teacher dropping, weights,
    the zero-shot export); one frozen model without them is the single-teacher objective of earlier runs."""
    return len(args.distill_from) > 1 or any(
        (
            args.distill_global_loss != "queue_kl",
            args.distill_balancing != "none",
            args.distill_teacher_drop > 0,
            args.distill_weights is not None,
            args.distill_zero_shot,
        )
    )


def dino_on(args: "DinoTrainingArguments") -> bool:
    """Whether the run trains with the DINO loss (and so its head, teacher forward and center)."""
    return args.dino_loss_weight > 0


def check_distillation(args: "DinoTrainingArguments") -> None:
    """The distillation options only with `--distill_from`, and what a run without DINO cannot take."""
    if args.dino_loss_weight < 0:
        fail("dino_loss_weight", args.dino_loss_weight, "a weight >= 0")
    if not distilling(args):
        changed = [name for name, default in _DISTILL_DEFAULTS.items() if getattr(args, name) != default]
        if changed:
            fail(
                changed[0],
                getattr(args, changed[0]),
                "leave it unset, or name the model to distil with --distill_from",
            )
        if not dino_on(args):
            fail("dino_loss_weight", 0, "a weight > 0: with no --distill_from the DINO loss is the objective")
        return
    for name in ("distill_global_weight", "distill_local_weight"):
        if getattr(args, name) < 0:
            fail(name, getattr(args, name), "a weight >= 0")
    if not (args.distill_global_weight or args.distill_local_weight or dino_on(args)):
        fail("distill_global_weight", 0, "a weight > 0 for at least one term of the objective")
    if args.distill_queue_size is not None and args.distill_queue_size < 1:
        fail("distill_queue_size", args.distill_queue_size, "a number of features >= 1, or unset (by dataset size)")
    _check_teachers(args)
    if dino_on(args):
        if args.distill_mixup:
            fail("distill_mixup", True, "mixup mixes the distillation view alone: use it with --dino_loss_weight 0")
        return
    without_dino = {
        "local_crops_number": "the local crops feed the DINO loss alone; set --local_crops_number 0",
        "ibot_loss_weight": "iBOT needs the DINO teacher; set --dino_loss_weight > 0 or --ibot_loss_weight 0",
        "koleo_weight": "KoLeo regularises the DINO run's features; set --dino_loss_weight > 0 or --koleo_weight 0",
        "gram_loss_weight": "Gram anchoring is part of a DINO run; set --dino_loss_weight > 0 or --gram_loss_weight 0",
        "anchor_cosine_weight": "the anchor is part of a DINO run; set --dino_loss_weight > 0 or 0 here",
    }
    for name, fix in without_dino.items():
        if getattr(args, name):
            fail(name, getattr(args, name), f"0 with --dino_loss_weight 0 ({fix})")
    if args.augment_on == "gpu":
        fail("augment_on", "gpu", "cpu with --dino_loss_weight 0: the one-view distillation crops are made per image")


def _check_teachers(args: "DinoTrainingArguments") -> None:
    """Each frozen model named as `--model_name_or_path` would be, once, with one weight and size each."""
    count = len(args.distill_from)
    for spec in args.distill_from:
        _check_distill_source(spec)
    repeated = sorted({spec for spec in args.distill_from if args.distill_from.count(spec) > 1})
    if repeated:
        fail("distill_from", args.distill_from, f"each frozen model once; {repeated[0]} is named twice")
    if args.distill_weights is not None:
        if len(args.distill_weights) != count or any(weight < 0 for weight in args.distill_weights):
            fail("distill_weights", args.distill_weights, f"{count} weights >= 0, one per --distill_from model")
        if not any(args.distill_weights):
            fail("distill_weights", args.distill_weights, "at least one weight > 0")
    sizes = args.distill_teacher_size
    if sizes is not None and (len(sizes) not in (1, count) or any(size < 1 for size in sizes)):
        fail(
            "distill_teacher_size",
            sizes,
            f"one side in pixels for every frozen model, or {count} (one per --distill_from model), e.g. 224",
        )
    if args.distill_balancing_batches < 1:
        fail("distill_balancing_batches", args.distill_balancing_batches, "a number of batches >= 1")
    if not 0 <= args.distill_teacher_drop < 1:
        fail("distill_teacher_drop", args.distill_teacher_drop, "a probability in [0, 1); UNIC uses 0.5")
    if args.distill_teacher_drop and count < 2:
        fail("distill_teacher_drop", args.distill_teacher_drop, "0 with one frozen model (it drops among several)")
    if several_teachers(args) and args.distill_mixup:
        fail("distill_mixup", True, "off with several frozen models or their options (mixup is single-teacher)")


def _check_distill_source(spec: str) -> None:
    """`--distill_from` names a model as `--model_name_or_path` would (a vision model is checked once built)."""
    if spec.startswith(TIMM_PREFIX):
        check_timm_name("distill_from", spec)
    elif os.path.isdir(spec):
        config_file = Path(spec) / "config.json"
        if not config_file.is_file():
            fail("distill_from", spec, f"{accepted_models_text()} (this folder has no config.json)")
        config = json.loads(config_file.read_text())
        if "architecture" not in config:
            try:
                check_vision_config(config, spec, frozen=True)
            except ValueError as error:
                raise ValueError(f"--distill_from: {error}") from None
    elif os.path.isfile(spec):
        if not spec.endswith((".pth", ".pt", ".safetensors")):
            fail("distill_from", spec, "a reference DINO checkpoint file ending in .pth, .pt or .safetensors")
    elif spec in PRESETS:
        fail(
            "distill_from",
            spec,
            "a model with trained weights (a folder, a Hub id, timm:NAME or a checkpoint file); a DinoModel preset "
            "has random weights, and a student learns nothing from them",
        )
    elif missing_local_path(spec):
        fail("distill_from", spec, "an existing model folder or checkpoint file: nothing is at that path")
    elif not is_hub_id(spec):
        fail("distill_from", spec, "an existing model folder or checkpoint file, timm:NAME, or a Hub id org/name")


__all__ = ["DistillationArguments", "check_distillation", "dino_on", "distilling"]
