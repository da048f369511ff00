"""DINO pretraining: `accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--flag value ...]`.

With no arguments it trains the tiny demo recipe (configs/demo.yaml) on a generated image dataset,
on the CPU in a few minutes, and prints the k-NN accuracy of the random-init and the trained teacher
(of the starting and the trained teacher for a run from trained weights); with an evaluation set the
teacher of the best k-NN is kept in OUTPUT_DIR/teacher_backbone_best, and `--stop_if_knn_drops POINTS`
ends the run (status 0) when the k-NN falls that far below its best.

SIGTERM or SIGUSR1 (a scheduler's preemption notice, `timeout`) and SIGINT (Ctrl-C) make it
checkpoint at the end of the current step and exit with status 0, also when they reach every
process of the job as schedulers and terminals send them (the data loader's workers ignore them);
a second Ctrl-C stops at once, without that checkpoint. Run the same command with
`--resume_from_checkpoint latest` to go on. What the run prints also goes to OUTPUT_DIR/train.log
(appended to, by the main process), and a terminal or pipe reader that goes away (`| tee` gets the
job's signal too) stops neither the run nor its checkpoint.
A wrong setting exits with status 2, a run stopped by a non-finite loss or a failed checkpoint
write with status 1, each with a message that says what to change.
"""

import sys
from pathlib import Path

from accelerate import PartialState

from dino_hf.convert.export import loading_snippet
from dino_hf.evaluation.knn import figure_name, guarded_figure
from dino_hf.run_files.checkpoints import CheckpointError
from dino_hf.training.arguments import parse_training_args
from dino_hf.training.console import LOG_FILE_NAME, RunConsole, quiet_transformers_progress
from dino_hf.training.plan import head_only, unguarded
from dino_hf.training.trainer import NonFiniteLossError, train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str]) -> int:
    quiet_transformers_progress()
    # A pipe reader or terminal that goes away (`| tee` gets the job's SIGTERM too) stops neither
    # the run nor its checkpoint: the output goes on to OUTPUT_DIR/train.log.
    with RunConsole() as console:
        return run(argv, console)


def run(argv: list[str], console: RunConsole) -> int:
    if not argv:
        argv = ["--config", str(DEMO_CONFIG)]
    try:
        args = parse_training_args(argv)
    except ValueError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    console.log_to(Path(args.output_dir) / LOG_FILE_NAME)
    try:
        result = train(args)
    except (NonFiniteLossError, CheckpointError) as error:
        print(f"pretrain.py: training stopped: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a setting that only the built model or the opened data can refute
        console.drop_unstarted_log()
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    if not PartialState().is_main_process:
        return 0
    if result.stopped_by is not None:
        print(
            f"Stopped by {result.stopped_by} after step {result.global_step}; the training state is in "
            f"{result.checkpoint}. Resume with the same command and --resume_from_checkpoint latest."
        )
        return 0
    # A run whose backbone stayed frozen (a head warm-up as long as the run) is named for what it gave.
    trained = "head-only" if head_only(args, result.global_step) else "trained"
    figure = guarded_figure(result.knn)
    if unguarded(args):
        print(
            f"No evaluation set: the run cannot tell whether {result.export_dir} is its start's equal or better. "
            f"Compare the two on labelled images: python scripts/eval_knn.py --model {result.export_dir} "
            "--train_dir TRAIN --eval_dir VAL, and the same with --model the start."
        )
    if result.knn_start and figure:
        print(
            f"{figure_name(figure)}: {result.start} {result.exported} "
            f"{result.knn_start.get(figure, float('nan')):.1f}% -> {trained} {result.exported} "
            f"{result.knn[figure]:.1f}%"
        )
    if result.knn_stop:
        print(f"Stopped early: {result.knn_stop}.")
    best = guarded_figure(result.knn_best)
    if result.best_export_dir and best:
        print(
            f"The {result.exported} of the best {figure_name(best)}, {result.knn_best[best]:.1f}% at step "
            f"{result.knn_best_step}, is in {result.best_export_dir}."
        )
    if trained == "head-only":
        print(
            f"The backbone was frozen for all {result.global_step} steps (--head_warmup_steps "
            f"{args.head_warmup_steps}): only the DINO head trained, and the {result.exported} backbone is the one "
            "the run started from. To train it, set --head_warmup_steps below the run's steps."
        )
    print(f"The {trained} {result.exported} backbone is in {result.export_dir}. Load it with:")
    print(f"    {loading_snippet(result.export_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
