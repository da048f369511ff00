"""Tiny training runs shared by the k-NN guard, --init_from_checkpoint, CLI refusal and end-to-end
script tests: the same settings through the real CLI (a subprocess), through the script's `main(argv)`
in this process, and through `train(DinoTrainingArguments(...))`.

A run trains a tiny DinoModel (32 px, hidden 32, 2 layers, patch 8) on the 24 images of the `data`
fixture: batches of 4, 16 samples per epoch, 2 epochs = 8 steps.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.trainer import train

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "pretrain.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = {
    "global_crops_size": 32,
    "local_crops_size": 16,
    "local_crops_number": 2,
    "out_dim": 64,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "per_device_train_batch_size": 4,
    "dataloader_num_workers": 0,
    "samples_per_epoch": 16,
    "shuffle_buffer_size": 8,
    "num_train_epochs": 2,
    "checkpointing_steps": "2",
    "logging_steps": 1,
}


def cli_arguments(options: dict) -> list[str]:
    """`{"out_dim": 64, ...}` as `--out_dim 64 ...`."""
    argv = []
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    return argv


def pretrain_arguments(data: Path, output_dir: Path, *extra: str, **settings) -> list[str]:
    """scripts/pretrain.py's arguments for a TINY run (`settings` replacing TINY's values) on the `data`
    fixture's images and starting model, writing to `output_dir`; then `extra`."""
    return [
        *cli_arguments({**TINY, **settings}),
        "--train_dir",
        str(data / "images"),
        "--model_name_or_path",
        str(data / "model"),
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python scripts/pretrain.py ARGV` in a subprocess."""
    return subprocess.run([sys.executable, str(SCRIPT), *argv], env=ENV, capture_output=True, text=True, timeout=300)


def pretrain_main():
    """scripts/pretrain.py's `main(argv) -> exit status`, loaded in this process."""
    spec = importlib.util.spec_from_file_location("pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def reset_accelerate() -> None:
    """Forget the Accelerate state of a run made in this process, so that the next one starts afresh."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_in_process(**options):
    """`train` with the TINY settings and `options`; returns its `TrainResult`."""
    try:
        return train(DinoTrainingArguments(**{**TINY, **options}))
    finally:
        reset_accelerate()


def saved(folder: Path, part: str) -> dict:
    """The tensors of `part` (student, teacher, dino_loss) of the checkpoint `folder`."""
    return load_file(folder / f"{part}.safetensors")


def trainer_state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())
