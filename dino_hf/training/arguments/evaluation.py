"""The evaluation settings of a run (the k-NN measured during training and its guard), and their checks."""

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class EvaluationArguments:
    """The in-training k-NN evaluation and its guard."""

    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Labelled dataset for k-NN during training."}
    )
    eval_dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    eval_train_dir: str | None = field(
        default=None, metadata={"help": "Labelled image folder for k-NN (class sub-folders)."}
    )
    eval_train_split: str = field(default="train", metadata={"help": "k-NN memory bank split."})
    eval_split: str = field(default="validation", metadata={"help": "k-NN query split."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (found automatically)."})
    eval_steps: int | None = field(default=None, metadata={"help": "Run k-NN every this many steps (and at the end)."})
    eval_image_size: int | None = field(
        default=None, metadata={"help": "k-NN input size (default: global crop size)."}
    )
    stop_if_knn_drops: float | None = field(
        default=None,
        metadata={
            "help": "Stop the run (with a checkpoint and the final export, exit status 0) when the teacher's "
            "k-NN top-1 falls this many points below its best; the best teacher is kept as "
            "OUTPUT_DIR/teacher_backbone_best either way. Needs --eval_steps and an evaluation set. Unset: off."
        },
    )


def check_evaluation(args: "DinoTrainingArguments") -> None:
    """The labelled splits of the in-training k-NN, and the k-NN guard only with an evaluation set."""
    check_ranges(args, positive_or_unset=("eval_steps", "eval_image_size"))
    if args.eval_train_dir:
        for split in (args.eval_train_split, args.eval_split):
            if not os.path.isdir(os.path.join(args.eval_train_dir, split)):
                fail(
                    "eval_train_dir",
                    args.eval_train_dir,
                    f"a folder holding the sub-folders {args.eval_train_split}/ and {args.eval_split}/ "
                    "of labelled images",
                )
    if args.eval_steps is not None and not (args.eval_dataset_name or args.eval_train_dir or args.demo):
        fail("eval_steps", args.eval_steps, "set it together with --eval_dataset_name or --eval_train_dir")
    if args.stop_if_knn_drops is not None and (args.stop_if_knn_drops <= 0 or args.eval_steps is None):
        fail(
            "stop_if_knn_drops",
            args.stop_if_knn_drops,
            "points of k-NN top-1 accuracy > 0, set together with --eval_steps N and an evaluation set "
            "(--eval_train_dir or --eval_dataset_name)",
        )


__all__ = ["EvaluationArguments", "check_evaluation"]
