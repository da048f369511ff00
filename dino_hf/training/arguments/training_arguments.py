"""`DinoTrainingArguments`, the one dataclass of a run's settings, made of the groups beside this file.

DINO's own hyperparameters keep the names and defaults of the reference implementation (ViT-S/16,
"vanilla" 100-epoch recipe, paper Sec. 3 and Appendix); the generic ones take the names of the Hugging
Face example scripts. Each group (model, objective, distillation, LoRA, optimisation, augmentation, data,
evaluation, output, speed, Hub) is a dataclass of its fields in a file of its own, with its checks; an
option is added there, and `validate` runs every group's checks.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...run_files.init_checkpoint import take_architecture
from .augmentation import AugmentationArguments, check_augmentation
from .data import DataArguments, check_data
from .distillation import DistillationArguments, check_distillation
from .evaluation import EvaluationArguments, check_evaluation
from .hub import SECRET_FIELDS, HubArguments, check_hub
from .lora import LoraArguments, check_lora
from .model import ModelArguments, check_model
from .objective import ObjectiveArguments, check_objective
from .optimisation import OptimisationArguments, check_optimisation
from .output import OutputArguments, check_output
from .speed import SpeedArguments, check_speed

# The DINO head's and local crops' settings, without effect in a run without the DINO loss.
_DINO_HEAD_FIELDS = (
    "out_dim",
    "norm_last_layer",
    "use_bn_in_head",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_nlayers",
    "head_warmup_steps",
    "freeze_last_layer",
    "local_crops_size",
    "local_crops_scale",
    "local_crops_number",
)

# The groups in the order `--help` shows them, each with its checks.
GROUPS = (
    ("model", ModelArguments, check_model),
    ("objective", ObjectiveArguments, check_objective),
    ("distillation", DistillationArguments, check_distillation),
    ("LoRA", LoraArguments, check_lora),
    ("optimisation", OptimisationArguments, check_optimisation),
    ("augmentation", AugmentationArguments, check_augmentation),
    ("data", DataArguments, check_data),
    ("evaluation", EvaluationArguments, check_evaluation),
    ("output", OutputArguments, check_output),
    ("speed", SpeedArguments, check_speed),
    ("Hub", HubArguments, check_hub),
)


@dataclass
class DinoTrainingArguments(
    HubArguments,
    SpeedArguments,
    OutputArguments,
    EvaluationArguments,
    DataArguments,
    AugmentationArguments,
    OptimisationArguments,
    LoraArguments,
    DistillationArguments,
    ObjectiveArguments,
    ModelArguments,
):
    """Every setting of a run (a dataclass's fields come from its bases in reverse order: model first)."""

    def __post_init__(self):
        self.global_crops_scale = [float(x) for x in self.global_crops_scale]
        self.local_crops_scale = [float(x) for x in self.local_crops_scale]
        self.color_jitter = [float(x) for x in self.color_jitter]
        self.blur_sigma = [float(x) for x in self.blur_sigma]
        self.blur_p = [float(x) for x in self.blur_p]
        self.mask_ratio_min_max = [float(x) for x in self.mask_ratio_min_max]
        # One frozen model or one size may be given alone (a config's `distill_from: org/name`, the Python API).
        if isinstance(self.distill_from, str):
            self.distill_from = [self.distill_from]
        if isinstance(self.distill_teacher_size, int):
            self.distill_teacher_size = [self.distill_teacher_size]
        if self.init_from_checkpoint:
            take_architecture(self)  # the networks to build are the checkpoint's
        validate(self)

    @property
    def checkpoint_every_epoch(self) -> bool:
        return self.checkpointing_steps == "epoch"

    @property
    def gram_teacher_crops_size(self) -> int:
        """The side of the global crops the Gram teacher sees (`--gram_teacher_resolution_scale`)."""
        return round(self.global_crops_size * self.gram_teacher_resolution_scale)

    def to_dict(self) -> dict:
        """The resolved configuration, secrets removed: what is saved next to every checkpoint."""
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            values.pop(name, None)
        return values

    def settings_in_effect(self) -> dict:
        """`to_dict()` without the settings this run leaves without effect (what a model card lists): the DINO
        objective's and head's without the DINO loss (the teacher momentum stays for an EMA student), the
        distillation settings without a frozen model, LoRA's without LoRA."""
        unused = set()
        if self.dino_loss_weight == 0:
            unused |= {field.name for field in dataclasses.fields(ObjectiveArguments)}
            unused |= set(_DINO_HEAD_FIELDS)
            if not self.distill_ema_student:
                unused.add("momentum_teacher")
        if self.distill_from is None:
            unused |= {field.name for field in dataclasses.fields(DistillationArguments)} - {"dino_loss_weight"}
        if self.lora_rank == 0:
            unused |= {field.name for field in dataclasses.fields(LoraArguments)} - {"lora_rank"}
        return {name: value for name, value in self.to_dict().items() if name not in unused}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def validate(args: DinoTrainingArguments) -> None:
    """Check every field before any work starts; each error names the field, the value and what is allowed.

    Checks what can be known without building the model or reading data: ranges and choices, that
    local folders and files exist, that a backbone name is known, and the crop sizes against the
    patch size of a preset or saved DinoModel (`train` checks other backbones once built).
    """
    # The ranges and choices that need nothing else first, then what a value means for the others.
    for check in (
        check_optimisation,
        check_augmentation,
        check_output,
        check_speed,
        check_objective,
        check_model,
        check_distillation,
        check_lora,
        check_data,
        check_evaluation,
        check_hub,
    ):
        check(args)


__all__ = ["GROUPS", "DinoTrainingArguments", "validate"]
