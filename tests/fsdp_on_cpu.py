"""`scripts/pretrain.py` under Accelerate's FSDP2 on CPU processes (gloo), for the tests.

Accelerate turns FSDP on for accelerators only (on the CPU it falls back to DDP). This launcher
declares the FSDP2 state on the Accelerator that the trainer creates, so that the whole FSDP path runs
on a CPU-only machine: Accelerate's `fully_shard` of the student by the DinoModel's blocks, the teacher
sharded like it, the EMA on shards, and whole weights gathered for checkpoints and the export.
Usage: `accelerate launch --multi_gpu --num_processes 2 tests/fsdp_on_cpu.py PRETRAIN_ARGS...` with
ACCELERATE_USE_CPU=true.
"""

import runpy
import sys
from pathlib import Path

import accelerate
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import dino_hf.training.trainer


class FsdpOnCpuAccelerator(accelerate.Accelerator):
    # Accelerate re-reads the process state when it prepares a model; the class keeps saying FSDP2.
    distributed_type = DistributedType.FSDP
    is_fsdp2 = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
        )


if __name__ == "__main__":
    dino_hf.training.trainer.Accelerator = FsdpOnCpuAccelerator
    script = Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
