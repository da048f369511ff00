"""A refused run leaves its output folder as it found it.

A setting or data that only the built model or the opened data can refute raises ValueError (exit
status 2) once the run has begun; what the run made in its output folder by then (the folder itself,
the best-teacher export of step 0, a tracker's logs) goes again, so that the next attempt starts
clean. Once the run has written a checkpoint, nothing is removed.
"""

import contextlib
import shutil
from pathlib import Path

from accelerate import PartialState

from .checkpoints import list_checkpoints


@contextlib.contextmanager
def removed_if_refused(output_dir: str | Path):
    """On a ValueError raised inside, before a checkpoint was written, remove what was made in
    `output_dir` since it was entered (main process; the error goes on)."""
    root = Path(output_dir)
    before = set(root.iterdir()) if root.is_dir() else None
    checkpoints_before = list_checkpoints(root / "checkpoints")
    try:
        yield
    except ValueError:
        if list_checkpoints(root / "checkpoints") == checkpoints_before and PartialState().is_main_process:
            made = [root] if before is None else [path for path in root.iterdir() if path not in before]
            for path in made:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


__all__ = ["removed_if_refused"]
