"""Agreement between the processes of a run: every process takes the same decision at the same step."""

import torch
from accelerate import Accelerator

from .checkpoints import WRITE_ERRORS


def on_any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on at least one process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).any())


def on_every_process(accelerator: Accelerator, action, main_only: bool = False) -> None:
    """Run `action` (on the main process only if `main_only`), then agree: a write error on any
    process is raised on every process, so that no process waits for one that gave up."""
    error = None
    if accelerator.is_main_process or not main_only:
        try:
            action()
        except WRITE_ERRORS as caught:
            error = caught
    if on_any_process(accelerator, error is not None):
        raise error or OSError("another process could not write its part of the checkpoint")


__all__ = ["on_any_process", "on_every_process"]
