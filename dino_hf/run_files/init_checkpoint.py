"""`--init_from_checkpoint`: a new run that starts from the networks of one of this project's training
checkpoints.

Unlike `--resume_from_checkpoint` (the same run, continued where it stopped), it takes the student,
the teacher (heads included) and the DINO loss state (the center) of the checkpoint, and nothing else:
the schedules start again at step 0 with a fresh optimiser, on this run's data and in its own output
folder. The networks are built with the checkpoint's own model settings (`ARCHITECTURE_FIELDS` of its
`training_args.json`) wherever this run leaves them at their defaults; a setting that this run gives
otherwise is refused before anything is built. The weights are then loaded strictly: every tensor of
the checkpoint into a tensor of the same name and shape, none left over on either side.
"""

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from .checkpoints import check_checkpoint, checkpoints_of_run, find_resume_checkpoint, is_checkpoint, named_checkpoint

# The training arguments that shape the student and the teacher: backbone and head.
ARCHITECTURE_FIELDS = (
    "model_name_or_path",
    "backbone",
    "config_overrides",
    "out_dim",
    "use_bn_in_head",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_nlayers",
)
FLAG = "init_from_checkpoint"


def named_init_checkpoint(args) -> Path:
    """The checkpoint folder that `args.init_from_checkpoint` names, judged by its layout (a run's
    output folder stands for its newest checkpoint). Raises ValueError as `named_checkpoint` does."""
    return named_checkpoint(args.init_from_checkpoint, FLAG, run_folder_means_latest=True, output_dir=args.output_dir)


def take_architecture(args) -> None:
    """Set the `ARCHITECTURE_FIELDS` that `args` (a `DinoTrainingArguments`) leaves at their defaults
    to the values the checkpoint was trained with.

    Raises:
        ValueError: `--init_from_checkpoint` is not a checkpoint or a run folder, is one of this run's own
            checkpoints, has no readable `training_args.json`, or was trained with other values of
            settings that `args` gives (all of them are named).
    """
    folder = named_init_checkpoint(args)
    if Path(args.output_dir).resolve() in folder.resolve().parents:
        raise ValueError(
            f"--{FLAG}={str(folder)!r} is not valid: it is in this run's --output_dir; a run that starts from a "
            "checkpoint writes to a new --output_dir (--resume_from_checkpoint continues the run itself)"
        )
    try:
        saved = json.loads((folder / "training_args.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--{FLAG}={str(folder)!r} is not valid: its training_args.json is unreadable ({error})"
        ) from None
    defaults = {field.name: field.default for field in dataclasses.fields(args)}
    differing = [name for name in ARCHITECTURE_FIELDS if getattr(args, name) not in (defaults[name], saved.get(name))]
    if differing:
        settings = ", ".join(f"--{name} {saved.get(name)!r} there, {getattr(args, name)!r} here" for name in differing)
        raise ValueError(
            f"--{FLAG}={str(folder)!r} is not valid: it was trained with other networks than this run asks for: "
            f"{settings}. Leave these settings out (the checkpoint's are taken) or give the checkpoint's values"
        )
    for name in ARCHITECTURE_FIELDS:
        if name in saved:
            setattr(args, name, saved[name])


def init_checkpoint_folder(path: str, output_dir: str) -> Path:
    """The checkpoint to load for `--init_from_checkpoint path`, its files checked: the folder itself,
    or the newest valid checkpoint of a run folder (damaged ones are reported and skipped).

    Raises:
        checkpoints.CheckpointError: the checkpoint is damaged.
        ValueError: a run folder without a valid checkpoint (see `named_checkpoint` for the rest).
    """
    path = Path(path)
    run = checkpoints_of_run(path) if path.is_dir() and not is_checkpoint(path) else []
    if not run:
        folder = named_checkpoint(path, FLAG, run_folder_means_latest=True, output_dir=Path(output_dir))
        check_checkpoint(folder)
        return folder
    newest = find_resume_checkpoint(run[-1].parent.parent, "latest")
    if newest is None:
        raise ValueError(f"--{FLAG} {path}: none of its checkpoints is readable ({', '.join(p.name for p in run)})")
    return newest


def _mismatch(part: str, expected: dict, found: dict) -> str | None:
    """What keeps the tensors `found` in the checkpoint from loading strictly into a module whose state is
    `expected`, or None."""
    missing = [name for name in expected if name not in found]
    unknown = [name for name in found if name not in expected]
    reshaped = [name for name in expected if name in found and expected[name].shape != found[name].shape]
    if not (missing or unknown or reshaped):
        return None
    problems = []
    if missing:
        first = ", ".join(missing[:3])
        problems.append(f"{len(missing)} of its {len(expected)} tensors are not in the checkpoint ({first})")
    if unknown:
        problems.append(f"{len(unknown)} of the checkpoint's {len(found)} are not in it ({', '.join(unknown[:3])})")
    if reshaped:
        shapes = ", ".join(
            f"{name} {tuple(found[name].shape)} in the checkpoint, {tuple(expected[name].shape)} here"
            for name in reshaped[:3]
        )
        problems.append(f"{len(reshaped)} differ in shape ({shapes})")
    return f"{part}: {'; '.join(problems)}"


def load_start(folder: Path, student: nn.Module, teacher: nn.Module | None, dino_loss: nn.Module | None) -> None:
    """Load the student, the teacher and the DINO loss state (center) of the checkpoint `folder` into
    the freshly built networks, every tensor of each (a run without an EMA network or without the DINO loss
    has None for it, and takes nothing of the checkpoint's).

    Raises:
        ValueError: a tensor of either side has no counterpart of the same name and shape (the counts and
            the first names of each part are given).
    """
    parts = {
        part: module
        for part, module in {"student": student, "teacher": teacher, "dino_loss": dino_loss}.items()
        if module is not None
    }
    missing = [f"it has no {part}.safetensors" for part in parts if not (folder / f"{part}.safetensors").is_file()]
    saved = {part: load_file(folder / f"{part}.safetensors") for part in parts if not missing}
    problems = missing or [_mismatch(part, module.state_dict(), saved[part]) for part, module in parts.items()]
    problems = [problem for problem in problems if problem is not None]
    if problems:
        raise ValueError(
            f"--{FLAG} {folder} does not fit the networks built for this run: {'. '.join(problems)}. The model and "
            "head settings left unset are taken from the checkpoint; check those given here (and "
            "--global_crops_size, which sets a preset's or timm ViT's position embeddings)"
        )
    for part, module in parts.items():
        module.load_state_dict(saved[part])


__all__ = ["ARCHITECTURE_FIELDS", "init_checkpoint_folder", "load_start", "named_init_checkpoint", "take_architecture"]
