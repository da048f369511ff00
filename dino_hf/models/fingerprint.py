"""Which weights a run was trained against, without copying them into its checkpoints: a SHA-256 of the
tensors (names, shapes, dtypes and bytes). Distillation records its frozen model's, LoRA its frozen base's,
and a resume with other weights is refused."""

import hashlib

import torch
from torch import nn


def weights_sha256(module: nn.Module) -> str:
    """A hash of `module`'s weights (names, shapes, dtypes and bytes, in name order): which frozen model a
    checkpoint was trained against, without copying it into the checkpoint."""
    return tensors_sha256(module.state_dict())


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The hash of `weights_sha256` over named tensors (a LoRA run's frozen base weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = ["tensors_sha256", "weights_sha256"]
