"""FSDP2 for DINO: a sharded student and a teacher sharded like it train as one unsharded process
does, and whole state dicts go out of and back into sharded networks.

Accelerate enables FSDP on accelerators only, so these tests shard the networks on the CPU (gloo)
with `fully_shard`, unit by unit as Accelerate's transformer-based wrap policy does with the
backbone's `_no_split_modules`; everything after the sharding is the training code itself.
"""

import copy

import pytest
import torch
from processes import assert_trains_as_one_process, run_in_processes
from tiny import TINY_VIT
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from dino_hf import DinoConfig
from dino_hf.models.backbones import build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.dino import DinoLoss
from dino_hf.run_files.whole_weights import (
    is_sharded,
    load_whole_optimizer_state_dict,
    load_whole_state_dict,
    whole_optimizer_state_dict,
    whole_state_dict,
)
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.sharding import shard_like
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

K = 64
# clip_grad 0.05 is below the gradients' norms, so the per-parameter clipping acts on sharded norms.
STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=0.05, freeze_last_layer=False)


def setup():
    """A 2-layer DinoModel student with its head, its teacher, a non-zero center and 3 batches of 8."""
    torch.manual_seed(0)
    config = DinoConfig(**TINY_VIT)
    student = MultiCropWrapper(
        build_backbone(config, drop_path_rate=0.0), DinoHead(32, out_dim=K, hidden_dim=48, bottleneck_dim=16)
    )
    teacher = build_teacher(student)
    dino_loss = DinoLoss(K, 4)
    dino_loss.center.copy_(0.1 * torch.randn(1, K))
    batches = [
        [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)] for _ in range(3)
    ]
    return student, teacher, dino_loss, batches


def shard_as_accelerate(model, mesh):
    """fully_shard on every module named in `_no_split_modules`, innermost first, then the root."""
    for module in reversed(list(model.modules())):
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _sharded_training(rank, world_size, results):
    mesh = init_device_mesh("cpu", (world_size,))
    student, teacher, dino_loss, batches = setup()
    shard_as_accelerate(student, mesh)
    shard_like(teacher, student)
    units = sorted(name for name, module in teacher.named_modules() if isinstance(module, FSDPModule))
    assert units == sorted(name for name, module in student.named_modules() if isinstance(module, FSDPModule))
    assert len(units) == 4 and is_sharded(teacher)  # embeddings, 2 layers, root
    optimizer = build_optimizer("sgd", get_param_groups(student))
    losses = []
    for crops in batches:
        local = [crop.chunk(world_size)[rank] for crop in crops]
        losses.append(train_step(student, teacher, dino_loss, optimizer, local, StepValues(**STEP))["loss"])
    losses = torch.tensor(losses)  # this process's half; the mean of the halves is the batch's loss
    torch.distributed.all_reduce(losses)
    losses = (losses / world_size).tolist()
    teacher_state = whole_state_dict(teacher)
    student_state = whole_state_dict(student)
    optimizer_state = whole_optimizer_state_dict(student, optimizer)

    # Whole weights back into freshly sharded networks: every process gets its shards again.
    fresh, _, _, _ = setup()
    shard_as_accelerate(fresh, mesh)
    fresh_optimizer = build_optimizer("sgd", get_param_groups(fresh))
    everywhere = [student_state, optimizer_state]
    torch.distributed.broadcast_object_list(everywhere, src=0)
    load_whole_state_dict(fresh, everywhere[0])
    load_whole_optimizer_state_dict(fresh, fresh_optimizer, everywhere[1])
    for (name, p), q in zip(student.named_parameters(), fresh.parameters()):
        assert isinstance(q, DTensor) and torch.equal(p.to_local(), q.to_local()), name
    reloaded = whole_optimizer_state_dict(fresh, fresh_optimizer)
    if rank == 0:
        results["teacher"] = teacher_state
        results["center"] = dino_loss.center.clone()
        results["losses"] = losses
        results["optimizer"] = optimizer_state
        results["reloaded_optimizer"] = reloaded
    else:
        assert teacher_state == {} and student_state == {}  # whole weights reach the main process only


@pytest.mark.slow
def test_sharded_student_and_teacher_train_as_one_process(tmp_path):
    """2 sharded processes x 4 images against 1 unsharded process x 8 images, 3 SGD steps.

    The EMA runs on each process's shards, the per-parameter clipping on norms gathered over the
    shards, the gradients are averaged by FSDP's reduce-scatter and the center all-reduced: the
    gathered teacher equals the unsharded one to float rounding (1e-6, far below the 3 steps' move).
    """
    results = run_in_processes(_sharded_training, 2, tmp_path)
    student, optimizer = assert_trains_as_one_process(results, setup, STEP)

    # The optimiser's state is keyed by parameter name, so the sharded run's loads into a plain one.
    expected = whole_optimizer_state_dict(student, optimizer)
    for saved in (results["optimizer"], results["reloaded_optimizer"]):
        assert saved["state"].keys() == expected["state"].keys()
        for name, state in expected["state"].items():
            torch.testing.assert_close(
                saved["state"][name]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=1e-6, msg=name
            )
    plain = copy.deepcopy(student)
    plain_optimizer = build_optimizer("sgd", get_param_groups(plain))
    load_whole_optimizer_state_dict(plain, plain_optimizer, results["optimizer"])
    assert len(plain_optimizer.state) == len(list(p for p in plain.parameters() if p.requires_grad))


def test_shard_like_leaves_an_unsharded_teacher_alone():
    student, teacher, _, _ = setup()
    assert shard_like(teacher, student) is teacher and not is_sharded(teacher)
    assert whole_state_dict(teacher).keys() == teacher.state_dict().keys()


def test_the_wrapper_names_the_backbone_blocks_for_fsdp():
    student, _, _, _ = setup()
    assert student._no_split_modules == ["DinoEmbeddings", "DinoLayer"]
    timm_student = MultiCropWrapper(build_backbone("timm:resnet18", drop_path_rate=0.0), DinoHead(512, out_dim=K))
    assert timm_student._no_split_modules is None
