"""The speed settings of a run, and their checks."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class SpeedArguments:
    """Options that change the speed of a run, not its numbers."""

    augment_on: str = field(
        default="cpu",
        metadata={
            "help": "Where the multi-crop augmentation runs: 'cpu' (in the DataLoader workers) or 'gpu' (the "
            "workers only decode and cap the image size; crops, resizes and colour ops run on the "
            "accelerator in batch)."
        },
    )
    augment_cap_size: int = field(
        default=288, metadata={"help": "With --augment_on gpu: side of the square images the workers send."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the backbones and heads."})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format (CNN backbones)."})

    log_sample_ids: str | None = field(
        default=None,
        metadata={
            "help": "Append the ids of every batch to this file, one JSON line per step and process "
            '({"step", "process", "ids"}): to check which samples each process saw, and that a resumed '
            "run reads on where the stopped one was."
        },
    )


def check_speed(args: "DinoTrainingArguments") -> None:
    """Where the crops are made and the cap on the sizes made on the accelerator."""
    check_ranges(args, positive=("augment_cap_size",))
    if args.augment_on not in ("cpu", "gpu"):
        fail("augment_on", args.augment_on, "cpu or gpu")


__all__ = ["SpeedArguments", "check_speed"]
