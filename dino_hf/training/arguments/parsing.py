"""Reading a run's settings from the command line and a YAML file, as the Hugging Face example scripts do
(transformers' `HfArgumentParser`): `--config FILE.yaml` sets the defaults, command-line flags override them.
"""

import argparse
import dataclasses
from pathlib import Path
from typing import get_type_hints

import yaml
from transformers import HfArgumentParser

from ...command_line import unknown_flags_message
from .checks import fail
from .data import DATA_SOURCE_FIELDS
from .training_arguments import GROUPS, DinoTrainingArguments

# One line: the settings, by group, follow it in `--help`.
USAGE = "%(prog)s [--config FILE.yaml] [--SETTING VALUE ...]"


def refuse_settings_without_effect(args: DinoTrainingArguments, given: set[str]) -> None:
    """Refuse a setting named on the command line (`given`: the field names there) that the other settings
    leave without effect; the same setting from a config file is named in the plan line instead
    (`TrainingPlan.notes`).

    Raises:
        ValueError: `--warmup_teacher_temp` different from `--teacher_temp` without a temperature warm-up,
            `--warmup_teacher_temp_epochs` with nothing to warm up, `--head_warmup_steps` with
            `--init_from_checkpoint` (whose head is trained already).
    """
    no_temperature_warmup = args.warmup_teacher_temp_epochs == 0
    if "warmup_teacher_temp" in given and no_temperature_warmup and args.warmup_teacher_temp != args.teacher_temp:
        fail(
            "warmup_teacher_temp",
            args.warmup_teacher_temp,
            f"a starting temperature needs a warm-up: --warmup_teacher_temp_epochs is 0, so the teacher "
            f"temperature is --teacher_temp {args.teacher_temp} from the first step; set "
            "--warmup_teacher_temp_epochs (e.g. 30, the paper's) or leave --warmup_teacher_temp out",
        )
    if "warmup_teacher_temp_epochs" in given and not no_temperature_warmup:
        if args.warmup_teacher_temp == args.teacher_temp:
            fail(
                "warmup_teacher_temp_epochs",
                args.warmup_teacher_temp_epochs,
                f"a warm-up from --warmup_teacher_temp to --teacher_temp, and both are {args.teacher_temp}; set "
                "--warmup_teacher_temp to the starting temperature (e.g. 0.04, the paper's) or leave "
                "--warmup_teacher_temp_epochs out",
            )
    if "head_warmup_steps" in given and args.head_warmup_steps and args.init_from_checkpoint:
        fail(
            "head_warmup_steps",
            args.head_warmup_steps,
            "a warm-up of a fresh head, and --init_from_checkpoint brings the checkpoint's trained head; leave "
            "--head_warmup_steps out (or 0)",
        )


def _given_fields(argv: list[str]) -> set[str]:
    """The field names of the flags in `argv` (`--no_norm_last_layer` names norm_last_layer)."""
    names = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return names | {name.removeprefix("no_") for name in names}


class _TrainingArgumentParser(HfArgumentParser):
    """HfArgumentParser that shows the settings by group (`--help`), and whose errors are `ValueError`s, so that
    scripts/pretrain.py says them on the first line of its output (argparse prints its usage first)."""

    def _add_dataclass_arguments(self, dtype):
        type_hints = get_type_hints(dtype)
        fields = {field.name: field for field in dataclasses.fields(dtype) if field.init}
        for title, group_class, _ in GROUPS:
            group = self.add_argument_group(f"{title} settings")
            for name in (field.name for field in dataclasses.fields(group_class)):
                field = fields[name]
                field.type = type_hints[name]
                self._parse_dataclass_field(group, field)

    def error(self, message: str):
        raise ValueError(f"{message}; see `scripts/pretrain.py --help`")


def parse_training_args(argv: list[str] | None = None) -> DinoTrainingArguments:
    """Parse `argv` as the Hugging Face example scripts do; `--config FILE.yaml` sets the defaults.

    Unknown keys in the YAML file are an error that lists them. A config's `demo: true` gives way to
    a data source (`--dataset_name`, `--train_dir`, `--data_files`) named on the command line or in the
    same file, so `--config configs/demo.yaml --train_dir ~/images` runs the demo recipe on those
    images; `--demo` given on the command line together with a data source is an error. A config's
    `eval_steps` and `stop_if_knn_drops` (the k-NN guard) are dropped when no evaluation set is named.
    """
    # Abbreviations off: argparse would take `--num_train_epoch 3` as --num_train_epochs, `--conf` as --config.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = _TrainingArgumentParser(DinoTrainingArguments, allow_abbrev=False, usage=USAGE)
    parser.add_argument("--config", default=None, help="YAML file of defaults; command-line flags override it.")
    if known.config:
        defaults = yaml.safe_load(Path(known.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(DinoTrainingArguments)}
        unknown = sorted(set(defaults) - names)
        if unknown:
            raise ValueError(
                f"{known.config}: unknown field(s) {', '.join(unknown)}; see `scripts/pretrain.py --help`"
            )
        parser.set_defaults(**defaults)
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        raise ValueError(unknown_flags_message(parser, unknown))
    values = {name: getattr(namespace, name) for name in (f.name for f in dataclasses.fields(DinoTrainingArguments))}
    demo_on_command_line = any(arg == "--demo" or arg.startswith("--demo=") for arg in rest)
    if values["demo"] and not demo_on_command_line and any(values[name] for name in DATA_SOURCE_FIELDS):
        values["demo"] = False  # a config's demo data gives way to data named on the command line or in the file
    if not (values["eval_dataset_name"] or values["eval_train_dir"] or values["demo"]):
        # A config's k-NN guard gives way when no evaluation set is named (unlabelled domain images); the
        # same flags given on the command line without one are refused by `validate`.
        for name in ("eval_steps", "stop_if_knn_drops"):
            if not any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in rest):
                values[name] = None
    args = DinoTrainingArguments(**values)
    refuse_settings_without_effect(args, _given_fields(rest))
    return args


__all__ = ["parse_training_args", "refuse_settings_without_effect"]
