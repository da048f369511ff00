"""The settings of a training run: `DinoTrainingArguments`, one dataclass made of a group per concern (a file
each, its fields and its checks), and `parse_training_args`, which reads them."""

from .checks import fail
from .distillation import dino_on, distilling, several_teachers, teacher_sizes, teacher_weights
from .lora import lora_on
from .model import DEFAULT_MODEL, check_crop_sizes, model_spec, preset_overrides
from .parsing import parse_training_args, refuse_settings_without_effect
from .training_arguments import GROUPS, DinoTrainingArguments, validate

__all__ = [
    "DEFAULT_MODEL",
    "GROUPS",
    "DinoTrainingArguments",
    "check_crop_sizes",
    "dino_on",
    "distilling",
    "fail",
    "lora_on",
    "model_spec",
    "parse_training_args",
    "preset_overrides",
    "refuse_settings_without_effect",
    "several_teachers",
    "teacher_sizes",
    "teacher_weights",
    "validate",
]
