"""Whole weights of a network and its optimiser, whether the run is sharded (FSDP2) or not.

Checkpoints and exports hold whole weights whatever the launch: `whole_state_dict` and
`whole_optimizer_state_dict` gather them (a collective under FSDP: every process calls them; the main
process gets the weights), and the `load_*` functions put whole weights back into a sharded or plain
network. A checkpoint written by an FSDP run therefore resumes in a DDP or single-process run and the
other way round.
"""

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

# Whole tensors on the CPU; under FSDP only the main process receives them (the others get {}).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True)
# A parameter that has not been stepped yet (the head's last layer while it is frozen) has no state.
_SCATTER_OPTIMIZER = StateDictOptions(full_state_dict=True, strict=False)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` holds sharded (FSDP2) parameters."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def whole_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict with whole tensors on the CPU. Under FSDP: a collective (every process
    calls it) and only the main process gets the tensors; the others get `{}`."""
    if not is_sharded(module):
        return {key: value.detach().cpu() for key, value in module.state_dict().items()}
    return get_model_state_dict(module, options=_GATHER)


def load_whole_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole weights (from `whole_state_dict`, on every process) into a sharded or plain
    `module`; each process keeps its shards."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    set_model_state_dict(module, state, options=_SCATTER)


def whole_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state keyed by parameter name, with whole tensors (a collective under FSDP; the
    main process gets it). Names, not positions, so that it loads into a sharded or plain run alike."""
    return get_optimizer_state_dict(model, _inner(optimizer), options=_GATHER)


def load_whole_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `whole_optimizer_state_dict` (on every process) into `optimizer` over `model`."""
    inner = _inner(optimizer)
    set_optimizer_state_dict(model, inner, state, options=_SCATTER_OPTIMIZER)
    # Loading gives every parameter a state first (torch runs a step at learning rate 0); the parameters
    # that the saved run had not stepped yet lose it again, so that their first real step is step 1.
    saved = set(state["state"])
    for name, param in model.named_parameters():
        if _canonical_name(name) not in saved:
            inner.state.pop(param, None)


def _canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (torch.compile, activation checkpointing), as
    torch's state-dict functions name it."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimiser behind Accelerate's `AcceleratedOptimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


__all__ = [
    "is_sharded",
    "load_whole_optimizer_state_dict",
    "load_whole_state_dict",
    "whole_optimizer_state_dict",
    "whole_state_dict",
]
