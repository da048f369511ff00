"""The objective settings of a run: DINO's loss and what a run adds to it (DINOv2's stabilisers, iBOT,
Gram anchoring and the cosine anchor), and their checks."""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ...models.backbones import MASKED_PATCH_MODELS
from ...models.configuration_dino import DinoConfig
from ...models.references import TIMM_PREFIX
from ...models.transformers_backbone import MASKABLE
from ...objectives.dino import CENTERINGS
from .checks import check_ranges, fail
from .model import model_spec

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class ObjectiveArguments:
    """DINO's loss, DINOv2's stabilisers, iBOT and the anchor to the start."""

    # ---- DINO objective ----------------------------------------------------------------------
    momentum_teacher: float = field(
        default=0.996, metadata={"help": "Base EMA momentum of the teacher, cosine to 1 (0.9995 for batch 256)."}
    )
    teacher_temp: float = field(default=0.04, metadata={"help": "Teacher temperature after warm-up (<= 0.07)."})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "Teacher temperature at step 0."})
    warmup_teacher_temp_epochs: float = field(
        default=0, metadata={"help": "Epochs of linear teacher temperature warm-up."}
    )
    student_temp: float = field(default=0.1, metadata={"help": "Student temperature."})
    center_momentum: float = field(default=0.9, metadata={"help": "EMA momentum of the teacher center."})

    # ---- small-data stabilisers (DINOv2, Oquab et al. 2023, Sec. 4), off by default ----------
    centering: Literal["center", "sinkhorn_knopp"] = field(
        default="center",
        metadata={
            "help": "How the teacher is centred: 'center' (the paper's running center, default) or "
            "'sinkhorn_knopp' (DINOv2's Sinkhorn-Knopp normalisation over the batch; the center is then "
            "not used)."
        },
    )
    sinkhorn_iterations: int = field(
        default=3, metadata={"help": "Sinkhorn-Knopp iterations with --centering sinkhorn_knopp (DINOv2: 3)."}
    )
    koleo_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the KoLeo regulariser on the student's backbone features of the global crops "
            "(DINOv2: 0.1); 0 turns it off."
        },
    )

    # ---- iBOT masked-patch loss (DINOv2 Sec. 3), off by default ------------------------------
    ibot_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of iBOT's masked-patch loss beside the DINO loss (DINOv2: 1.0): the student's global "
            "crops are block-masked with the backbone's mask token and its patch tokens predict the teacher's "
            "at the masked patches. Needs a ViT with a mask token (a DinoModel, or a transformers vit, deit, "
            "dinov2, dinov2_with_registers or dinov3_vit checkpoint); 0 turns it off."
        },
    )
    mask_ratio_min_max: list[float] = field(
        default_factory=lambda: [0.1, 0.5],
        metadata={"help": "Range of the fraction of patches a masked global crop hides (DINOv2: 0.1 0.5)."},
    )
    mask_sample_probability: float = field(
        default=0.5,
        metadata={"help": "Fraction of the global crops of a batch that are masked (DINOv2: 0.5)."},
    )
    ibot_separate_head: bool = field(
        default=False,
        metadata={
            "help": "Send the masked patch tokens through a head of their own, of the DINO head's shape (DINOv3); "
            "off, they share the DINO head (DINOv2)."
        },
    )

    # ---- anchoring to the starting weights (continued pretraining), off by default ------------
    gram_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of DINOv3's Gram anchoring loss: the patch-to-patch similarities of the student's "
            "global crops kept close to those of the Gram teacher (DINOv3 ramps it to 2.0); 0 turns it off."
        },
    )
    gram_warmup_steps: int = field(
        default=0,
        metadata={"help": "Steps over which the Gram loss weight ramps linearly from 0 (0: full weight at once)."},
    )
    gram_teacher: Literal["start", "ema"] = field(
        default="start",
        metadata={
            "help": "The Gram teacher: 'start', a frozen copy of the backbone taken before the first step (continued "
            "pretraining); or 'ema' (DINOv3), a snapshot of the EMA teacher's backbone taken at --gram_start_step "
            "and refreshed every --gram_update_steps; the Gram loss is off before the first snapshot. Saved with "
            "every checkpoint, so that a resumed run has the same Gram teacher."
        },
    )
    gram_start_step: int = field(
        default=0,
        metadata={
            "help": "--gram_teacher ema: the step before which the first snapshot of the EMA teacher is taken "
            "(DINOv3: 1M iterations); the Gram loss and its warm-up start there."
        },
    )
    gram_update_steps: int = field(
        default=0,
        metadata={
            "help": "--gram_teacher ema: refresh the snapshot every N steps after the first (DINOv3: 10000); 0 never "
            "refreshes it."
        },
    )
    gram_max_updates: int | None = field(
        default=None,
        metadata={"help": "--gram_teacher ema: refresh it at most this many times (DINOv3: 3); unset: no limit."},
    )
    gram_teacher_resolution_scale: float = field(
        default=1.0,
        metadata={
            "help": "DINOv3's high-resolution Gram teacher: it sees the global crops resized by this factor "
            "(bicubic), its patch-token map resized (bicubic) to the student's grid (DINOv3: 2.0); 1.0 is off. "
            "The crops' size times it must be a size the backbone takes (a multiple of a ViT's patch size)."
        },
    )
    gram_remove_neg: bool = field(
        default=False,
        metadata={"help": "Set the negative entries of both Gram matrices to 0 before their difference."},
    )
    anchor_cosine_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of 1 - cos(student feature, starting backbone's feature) of the global crops, against "
            "the same frozen copy as the Gram teacher; 0 turns it off."
        },
    )


def check_objective(args: "DinoTrainingArguments") -> None:
    """DINO's temperatures and momenta, the stabilisers, iBOT's masks and the anchor's schedule."""
    check_ranges(
        args,
        positive=("sinkhorn_iterations",),
        non_negative=(
            "warmup_teacher_temp_epochs",
            "koleo_weight",
            "gram_loss_weight",
            "gram_warmup_steps",
            "anchor_cosine_weight",
            "ibot_loss_weight",
        ),
    )
    for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
        if not 0 < getattr(args, name) <= 1:
            fail(
                name,
                getattr(args, name),
                "a temperature in (0, 1]; DINO uses 0.04-0.07 for the teacher, 0.1 for the student",
            )
    for name in ("momentum_teacher", "center_momentum"):
        if not 0 <= getattr(args, name) <= 1:
            fail(name, getattr(args, name), "a momentum in [0, 1]")
    if args.centering not in CENTERINGS:
        fail("centering", args.centering, "center (the paper's running center) or sinkhorn_knopp (DINOv2)")
    if args.koleo_weight and args.per_device_train_batch_size < 2:
        fail(
            "per_device_train_batch_size",
            args.per_device_train_batch_size,
            "at least 2 with --koleo_weight, which needs a nearest neighbour in each process's batch",
        )
    _check_gram(args)
    _check_ibot(args)


def _check_gram(args: "DinoTrainingArguments") -> None:
    """Gram anchoring's options (docs/recipe.md#ema-and-high-resolution-gram-teachers): the EMA Gram
    teacher's schedule only with `--gram_teacher ema`, the high-resolution Gram teacher only with the
    Gram loss."""
    if args.gram_teacher not in ("start", "ema"):
        fail("gram_teacher", args.gram_teacher, "start (a frozen copy of the backbone before the first step) or ema")
    for name in ("gram_start_step", "gram_update_steps", "gram_max_updates"):
        value = getattr(args, name)
        if value is not None and value < 0:
            fail(name, value, "a number of steps >= 0")
    if args.gram_teacher == "ema":
        if not args.gram_loss_weight:
            fail("gram_teacher", "ema", "the EMA Gram teacher serves the Gram loss: set --gram_loss_weight > 0")
        if args.anchor_cosine_weight:
            fail(
                "anchor_cosine_weight",
                args.anchor_cosine_weight,
                "0 with --gram_teacher ema: the cosine term anchors to the start (--gram_teacher start)",
            )
        if args.gram_max_updates is not None and not args.gram_update_steps:
            fail("gram_max_updates", args.gram_max_updates, "set together with --gram_update_steps N (the refreshes)")
    else:
        for name, unset in (("gram_start_step", 0), ("gram_update_steps", 0), ("gram_max_updates", None)):
            if getattr(args, name) != unset:
                fail(
                    name,
                    getattr(args, name),
                    "left unset with --gram_teacher start (taken once, before the first step); it schedules the "
                    "snapshots of --gram_teacher ema",
                )
    scale = args.gram_teacher_resolution_scale
    if scale != 1:
        if scale < 1 or not args.gram_loss_weight or args.anchor_cosine_weight:
            fail(
                "gram_teacher_resolution_scale",
                scale,
                "a factor >= 1 (DINOv3: 2.0) with --gram_loss_weight > 0 and --anchor_cosine_weight 0 (the cosine "
                "term compares features at the student's resolution); 1.0 turns it off",
            )
        if not math.isclose(args.global_crops_size * scale, args.gram_teacher_crops_size, abs_tol=1e-6):
            fail(
                "gram_teacher_resolution_scale",
                scale,
                f"a factor that makes the {args.global_crops_size} px global crops a whole number of pixels "
                f"(x {scale:g} gives {args.global_crops_size * scale:g}), e.g. 2.0",
            )


def _check_ibot(args: "DinoTrainingArguments") -> None:
    """iBOT's options: the mask settings, at least one masked crop per micro-batch, and a backbone with a
    mask token (what can be told from the arguments and a folder's config.json; `build_backbone`
    refuses the rest)."""
    if not args.ibot_loss_weight:
        if args.ibot_separate_head:
            fail("ibot_separate_head", True, "set together with --ibot_loss_weight > 0 (it is iBOT's patch head)")
        return
    ratio = args.mask_ratio_min_max
    if len(ratio) != 2 or not 0 <= ratio[0] <= ratio[1] <= 1:
        fail("mask_ratio_min_max", ratio, "two fractions 0 <= min <= max <= 1 of a crop's patches, e.g. 0.1 0.5")
    probability, crops = args.mask_sample_probability, 2 * args.per_device_train_batch_size
    if not 0 < probability <= 1 or int(crops * probability) < 1:
        fail(
            "mask_sample_probability",
            probability,
            f"a fraction in (0, 1] that masks at least one of the {crops} global crops of a micro-batch "
            f"(int({crops} x p) >= 1, so p >= {1 / crops:g} with --per_device_train_batch_size "
            f"{args.per_device_train_batch_size}); DINOv2 uses 0.5",
        )
    unmaskable = _unmaskable_backbone(args)
    if unmaskable:
        raise ValueError(
            f"--ibot_loss_weight={args.ibot_loss_weight!r} is not valid with {unmaskable}: iBOT replaces masked "
            f"patches by the backbone's mask token, which it has not; use {MASKED_PATCH_MODELS}"
        )


def _unmaskable_backbone(args: "DinoTrainingArguments") -> str | None:
    """What the run's backbone is when it is known to have no mask token (a timm model, a CNN or Swin of
    transformers), else None."""
    spec = model_spec(args)
    if spec.startswith(TIMM_PREFIX):
        return f"the timm model {spec}"
    config_file = Path(spec) / "config.json"
    if not (os.path.isdir(spec) and config_file.is_file()):
        return None
    config = json.loads(config_file.read_text())
    if "architecture" in config:
        return f"the timm model in {spec}"
    model_type = config.get("model_type")
    if model_type not in (*MASKABLE, DinoConfig.model_type):
        return f"the {model_type} model in {spec}"
    return None


__all__ = ["ObjectiveArguments", "check_objective"]
