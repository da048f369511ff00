"""Fully sharded training (FSDP2) of DINO's two networks.

Accelerate shards the student when the run is launched with FSDP (`accelerate launch --use_fsdp
--fsdp_version 2 ...`, or an Accelerate config file that says so). The teacher is not trained, so
Accelerate does not prepare it: `shard_like` shards it exactly as the student (the same modules on the
same device mesh), so that every process holds the matching shards of both networks and the EMA runs
on its own shards without communication (`local_tensors`).

Checkpoints hold whole weights whatever the launch (`dino_hf.run_files.whole_weights`).
"""

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..run_files.whole_weights import is_sharded


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's shard of each sharded tensor (a view: writing to it writes the parameter); plain
    tensors as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def shard_like(teacher: nn.Module, student: nn.Module, mp_policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Shard `teacher` as the sharded `student` is: `fully_shard` on the teacher's modules that are FSDP
    units in the student (same names), on the student's device mesh, innermost first, the root last.

    The teacher must be the student's architecture (`build_teacher`). Returns `teacher`, sharded in
    place; a student that is not sharded leaves it as it is.

    Args:
        mp_policy (`MixedPrecisionPolicy`, optional): the dtype the teacher's forward gathers its
            parameters in (Accelerate's `fsdp_plugin.mixed_precision_policy`); default full precision.
    """
    units = [name for name, module in student.named_modules() if isinstance(module, FSDPModule)]
    if not units:
        return teacher
    meshes = {p.device_mesh for p in student.parameters() if isinstance(p, DTensor)}
    if len(meshes) != 1:
        raise ValueError(f"the student's parameters lie on {len(meshes)} device meshes; shard_like expects one")
    (mesh,) = meshes
    # The teacher has no backward: every unit, the root too, frees its gathered weights after forward
    # (FSDP would otherwise keep the root's whole until a backward that never comes).
    for name in sorted(units, key=lambda unit: unit.count(".") + bool(unit), reverse=True):
        fully_shard(
            teacher.get_submodule(name),
            mesh=mesh,
            reshard_after_forward=True,
            mp_policy=mp_policy or MixedPrecisionPolicy(),
        )
    return teacher


__all__ = ["is_sharded", "local_tensors", "shard_like"]
