"""Helpers of the multi-process tests: spawn gloo process groups on the CPU, and check that a
distributed run trained as one process would have."""

import copy

import pytest
import torch

from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.step import StepValues, train_step


def accelerate_launch(processes: int = 2, machines: int = 1) -> list[str]:
    """`accelerate launch` of CPU processes, fp32, no dynamo: the start of every launch command here."""
    placement = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    return [
        "accelerate",
        "launch",
        *placement,
        "--num_processes",
        str(processes),
        "--num_machines",
        str(machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def run_in_processes(worker, world_size: int, tmp_path) -> dict:
    """Run `worker(rank, world_size, results)` in `world_size` processes joined in a gloo process
    group; returns what they put in the shared `results` dict."""
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(
            _in_process_group, args=(world_size, str(tmp_path / "init"), worker, results), nprocs=world_size
        )
        return dict(results)


def _in_process_group(rank, world_size, init_file, worker, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, results)
    finally:
        torch.distributed.destroy_process_group()


def assert_trains_as_one_process(distributed: dict, setup, step_options: dict):
    """The `losses`, `center` and `teacher` of a distributed run of SGD steps equal those of the same
    steps in this process on the whole batches of `setup()` (float rounding: 1e-6), and the steps
    moved the teacher by more than that. Returns the one-process student and optimiser."""
    student, teacher, dino_loss, batches = setup()
    initial = copy.deepcopy(teacher.state_dict())
    optimizer = build_optimizer("sgd", get_param_groups(student))
    losses = [
        train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**step_options))["loss"].item()
        for crops in batches
    ]
    assert [float(loss) for loss in distributed["losses"]] == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(distributed["center"], dino_loss.center, rtol=0, atol=1e-6)
    assert distributed["teacher"].keys() == teacher.state_dict().keys()
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(distributed["teacher"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert max((teacher.state_dict()[k] - v).abs().max().item() for k, v in initial.items()) > 1e-4
    return student, optimizer
