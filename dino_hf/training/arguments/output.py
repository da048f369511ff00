"""The output settings of a run (its folder, checkpoints and logs), and their checks."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate.utils import LoggerType

from ...run_files.checkpoints import named_checkpoint
from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class OutputArguments:
    """The output folder, checkpoints, resuming and logging."""

    output_dir: str = field(default="outputs/dino", metadata={"help": "Where checkpoints and the export go."})
    checkpointing_steps: str = field(
        default="epoch", metadata={"help": "Save the training state every N steps, or 'epoch'."}
    )
    checkpoints_total_limit: int = field(default=3, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    init_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Start a new run from the student, teacher, heads and center of a training checkpoint of "
            "this project (a checkpoint-<step> folder, or a run's OUTPUT_DIR for its newest): step 0, a fresh "
            "optimiser, this run's data and --output_dir. The model and head settings left unset are the "
            "checkpoint's. --resume_from_checkpoint continues the same run instead."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    report_to: str = field(
        default="none", metadata={"help": "Trackers through Accelerate: none, all, tensorboard, wandb, ..."}
    )
    skip_nonfinite_steps: int = field(
        default=0, metadata={"help": "Steps with a non-finite loss to skip before stopping (0: stop at the first)."}
    )


def check_output(args: "DinoTrainingArguments") -> None:
    """Logging and checkpointing: their intervals, the trackers, and the checkpoint to resume from."""
    check_ranges(args, positive=("logging_steps", "checkpoints_total_limit"), non_negative=("skip_nonfinite_steps",))
    trackers = [name.strip() for name in args.report_to.split(",")]
    known_trackers = ["none"] + [tracker.value for tracker in LoggerType]
    if any(name not in known_trackers for name in trackers) or ("none" in trackers and len(trackers) > 1):
        fail("report_to", args.report_to, f"none, or a comma-separated list of {', '.join(known_trackers[1:])}")
    if args.checkpointing_steps != "epoch" and not (
        args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) > 0
    ):
        fail("checkpointing_steps", args.checkpointing_steps, "a number of steps >= 1, or 'epoch'")
    if args.resume_from_checkpoint not in (None, "latest"):
        named_checkpoint(
            args.resume_from_checkpoint,
            "resume_from_checkpoint",
            output_dir=Path(args.output_dir),
            also_accepted="'latest' (the newest valid checkpoint under --output_dir)",
        )


__all__ = ["OutputArguments", "check_output"]
