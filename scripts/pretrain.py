"""DINO pretraining: `accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--flag value ...]`.

With no arguments it trains the tiny demo recipe (configs/demo.yaml) on a generated image dataset,
on the CPU in a few minutes, and prints the k-NN accuracy of the random-init and the trained teacher.

SIGTERM or SIGUSR1 (a scheduler's preemption notice, `timeout`) and SIGINT (Ctrl-C) make it
checkpoint at the end of the current step and exit with status 0, also when they reach every
process of the job as schedulers and terminals send them (the data loader's workers ignore them);
a second Ctrl-C stops at once, without that checkpoint. Run the same command with
`--resume_from_checkpoint latest` to go on.
A wrong setting exits with status 2, a run stopped by a non-finite loss or a failed checkpoint
write with status 1, each with a message that says what to change.
"""

import sys
from pathlib import Path

from accelerate import PartialState

from dino_hf.training.arguments import parse_training_args
from dino_hf.training.checkpoints import CheckpointError
from dino_hf.training.trainer import NonFiniteLossError, train

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str]) -> int:
    if not argv:
        argv = ["--config", str(DEMO_CONFIG)]
    try:
        args = parse_training_args(argv)
    except ValueError as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        return 2
    try:
        result = train(args)
    except (NonFiniteLossError, CheckpointError) as error:
        print(f"pretrain.py: training stopped: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a setting that only the built model or the opened data can refute
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
    if result.knn_random_init and result.knn:
        print(
            f"k-NN top-1 (k=20): random-init teacher {result.knn_random_init.get('knn_top1@20', float('nan')):.1f}% "
            f"-> trained teacher {result.knn.get('knn_top1@20', float('nan')):.1f}%"
        )
    print(f"The trained teacher backbone is in {result.export_dir}. Load it with:")
    loading = f'model = AutoModel.from_pretrained("{result.export_dir}")'
    print(f"    import dino_hf; from transformers import AutoModel; {loading}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
