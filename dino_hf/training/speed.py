"""Speed options of the training step that keep its numbers.

What is always on elsewhere: SDPA attention in `DinoModel` (flash / memory-efficient kernels on
GPU), one backbone call per crop resolution in `MultiCropWrapper`, the multi-tensor EMA of
`ema_update_`, bf16 autocast through `Accelerator(mixed_precision="bf16")`. What this file adds:

- (in `optimization.build_optimizer(..., device=...)`) PyTorch's fused optimiser kernel (one
  kernel for all parameters) on the devices that have it (CUDA, and the CPU in recent PyTorch: 5x
  faster than the multi-tensor form and 25x faster than the default loop for ViT-S sized tensors
  on this project's CPU), else its multi-tensor (`foreach`) form; the same update, rounding aside.
- `apply_speed_options`: optional `torch.compile` of the backbones and heads (one static graph per
  crop resolution) and channels_last weights for convolutional backbones.

Each option is checked against the plain step in tests/test_speed_options.py.
"""

import torch
from torch import nn


def apply_speed_options(
    student: nn.Module,
    teacher: nn.Module,
    *,
    torch_compile: bool = False,
    channels_last: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """Turn on the optional speed-ups of the student and teacher (`MultiCropWrapper`s), in place.

    Call it after `build_teacher` and before building the optimiser and `accelerator.prepare`.

    Args:
        student, teacher (`MultiCropWrapper`): modified in place and returned (the teacher may be None).
        torch_compile (`bool`, defaults to `False`): compile `compile_units` of both (each block of a
            ViT, or a CNN backbone whole, and the head) with `nn.Module.compile(dynamic=False)`: the
            modules stay where they are, so state-dict keys, checkpoints and the EMA are unchanged;
            each crop resolution (224 and 96) gets its own static graph, built on the first step,
            shared by all blocks.
            Random ops in a compiled graph (stochastic depth) draw from inductor's generator, not
            eager PyTorch's: the same distribution, other samples.
        channels_last (`bool`, defaults to `False`): store 4-D weights as NHWC, the layout of
            cuDNN's and oneDNN's fastest convolutions; for CNN backbones (a ViT has one conv).
    """
    for model in (network for network in (student, teacher) if network is not None):
        if not (hasattr(model, "backbone") and hasattr(model, "head")):
            raise TypeError(
                f"apply_speed_options takes the MultiCropWrapper student and teacher (with .backbone and "
                f".head), got {type(model).__name__}; apply it before accelerator.prepare"
            )
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if torch_compile:
            for unit in compile_units(model):
                unit.compile(dynamic=False)
    return student, teacher


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The modules `torch_compile` compiles one by one: each transformer block of a ViT backbone
    (a DinoModel's encoder layers, a timm ViT's `blocks`), as DINOv3 does, so that one compiled graph
    per crop resolution serves every block; a backbone without blocks (a CNN) whole; the head; and
    iBOT's separate head where there is one."""
    inner = getattr(model.backbone, "model", model.backbone)
    encoder = getattr(inner, "encoder", None)
    blocks = getattr(encoder, "layer", None) if encoder is not None else getattr(inner, "blocks", None)
    units = list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) else [model.backbone]
    return units + [head for head in (model.head, model.ibot_head) if head is not None]


__all__ = ["apply_speed_options", "compile_units"]
