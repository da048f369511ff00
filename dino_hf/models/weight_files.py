"""Reading weights files without running code from them.

A .safetensors file is read with safetensors; a .pth / .bin file with `torch.load(weights_only=True)`,
which loads tensors, numbers, strings and containers but never unpickles code or arbitrary classes;
the one class it allows beyond those is `argparse.Namespace`, which the reference DINO stores as the
`args` of its checkpoints.
"""

import argparse
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a .safetensors file, or a .pth / .bin file with `torch.load(weights_only=True)` on the CPU.

    Tensors, numbers, strings and containers load, and so does the `argparse.Namespace` the reference
    stores as `args`. Anything else (code, arbitrary classes) is refused with a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line for line in str(error).splitlines() if "GLOBAL" in line] or [str(error).strip().splitlines()[-1]]
        reason = lines[0].strip()
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, which dino_hf does not "
            f"unpickle ({reason}). If you trust the file, open it yourself with weights_only=False and "
            "save only its state dicts (e.g. its 'teacher' entry) with torch.save or safetensors"
        ) from error


__all__ = ["load_checkpoint_file"]
