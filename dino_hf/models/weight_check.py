"""Every weight loaded, or a refusal that says which were not.

transformers' `from_pretrained` and timm's loaders can go on with random weights where a checkpoint
does not fill a model (a warning in a long log). Before a run trains anything, the checkpoint's own
tensors are read back from its files and compared with the model's: a missing tensor, one the model
does not have, a shape that differs, or a tensor whose values did not arrive stops the run with the
counts and the first names. A task head that DINO drops on purpose (a classifier saved with the
backbone) is named in the log instead.
"""

import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import revert_weight_conversion
from transformers.utils import cached_file

from .weight_files import load_checkpoint_file

logger = logging.getLogger(__name__)

# Weights files of a saved model, in the order transformers looks for them.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Names shown per kind of problem in a refusal.
_SHOWN = 5


class WeightLoadingError(ValueError):
    """A checkpoint that does not fill its model (a ValueError: the CLI exits with status 2)."""


def weight_files(name_or_path: str | os.PathLike, **hub_options) -> list[Path]:
    """The weights files of a saved model (a folder or a Hub id), shards included.

    Raises:
        WeightLoadingError: none of model.safetensors, pytorch_model.bin or their sharded indexes.
    """
    for name in _WEIGHT_FILES:
        path = _resolve(name_or_path, name, **hub_options)
        if path is None:
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            return [_resolve(name_or_path, shard, **hub_options) or path.parent / shard for shard in shards]
        return [path]
    raise WeightLoadingError(f"{name_or_path} has no weights file (looked for {', '.join(_WEIGHT_FILES)})")


def _resolve(name_or_path, filename: str, **hub_options) -> Path | None:
    if os.path.isdir(name_or_path):
        path = Path(name_or_path) / filename
        return path if path.is_file() else None
    path = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False, **hub_options)
    return Path(path) if path else None


def read_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the weights files, one at a time (safetensors lazily)."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        else:
            yield from load_checkpoint_file(path).items()


def checkpoint_keys(name_or_path: str | os.PathLike, **hub_options) -> set[str]:
    """The tensor names in a saved model's weights files (read from the headers where safetensors)."""
    keys = set()
    for path in weight_files(name_or_path, **hub_options):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt", device="cpu") as handle:
                keys.update(handle.keys())
        else:
            keys.update(load_checkpoint_file(path))
    return keys


@contextmanager
def _quiet_transformers_loading():
    """transformers' own load report (and its progress bar) is replaced by this module's check and refusal."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def load_checked(
    model_class,
    name_or_path: str,
    *,
    dropped_prefixes: tuple[str, ...] = (),
    new_tensors: tuple[str, ...] = (),
    **kwargs,
) -> nn.Module:
    """`model_class.from_pretrained(name_or_path, **kwargs)` in fp32, then every tensor checked.

    Returns the model when each of its tensors came from the checkpoint (the checkpoint's tensors
    compared by value) and each of the checkpoint's tensors went into it, except those under
    `dropped_prefixes` (task heads), which are logged. `new_tensors` are parts the caller adds to the
    architecture on purpose (a mask token for masked patches) and initialises itself.

    Raises:
        WeightLoadingError: missing, unexpected or mis-shaped tensors, or tensors whose values differ
            from the checkpoint's after loading.
    """
    with _quiet_transformers_loading():
        try:
            model, info = model_class.from_pretrained(
                name_or_path, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32, **kwargs
            )
        except (OSError, RuntimeError) as error:
            raise WeightLoadingError(f"{name_or_path}: the checkpoint could not be read ({error})") from None
    prefix = getattr(model, "base_model_prefix", "")
    unexpected = sorted(key for key in info["unexpected_keys"] if not _dropped(key, prefix, dropped_prefixes))
    dropped = sorted(set(info["unexpected_keys"]) - set(unexpected))
    problems = {
        "missing from the checkpoint (they would start from random init)": sorted(
            set(info["missing_keys"]) - set(new_tensors)
        ),
        "in the checkpoint but not in the model": unexpected,
        "of a different shape": [f"{key} {tuple(a)} vs {tuple(b)}" for key, a, b in sorted(info["mismatched_keys"])],
        "not equal to the checkpoint's after loading": _differing(
            on_disk_state_dict(model),
            weight_files(name_or_path, **_hub_options(kwargs)),
            prefix,
        ),
    }
    refuse_problems(problems, name_or_path, type(model).__name__)
    if dropped:
        logger.warning(
            "%s: %d tensor(s) of a task head are left out, as DINO trains the backbone alone: %s",
            name_or_path,
            len(dropped),
            ", ".join(dropped[:_SHOWN]) + (", ..." if len(dropped) > _SHOWN else ""),
        )
    return model


def on_disk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's tensors under the names `save_pretrained` writes them with (transformers
    v5 renames some in memory, e.g. ViT's `layers.{i}.attention.q_proj`)."""
    return revert_weight_conversion(model, dict(model.state_dict()))


def _hub_options(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in ("revision", "token", "cache_dir", "subfolder") if key in kwargs}


def _dropped(key: str, prefix: str, dropped_prefixes: tuple[str, ...]) -> bool:
    return key.removeprefix(f"{prefix}.").startswith(dropped_prefixes) if prefix else key.startswith(dropped_prefixes)


def _differing(model_state: dict[str, torch.Tensor], files: list[Path], prefix: str) -> list[str]:
    """Checkpoint tensors whose values are not the model's. `model_state` has the on-disk names (those
    transformers writes with `save_pretrained`, its in-memory renames reverted); a checkpoint of a
    task model may prefix them with the backbone's `base_model_prefix`."""
    differing = []
    for key, tensor in read_tensors(files):
        name = key if key in model_state else key.removeprefix(f"{prefix}.") if prefix else key
        target = model_state.get(name)
        if target is None or target.shape != tensor.shape:
            continue
        if not torch.equal(target.detach().cpu(), tensor.to(target.dtype)):
            differing.append(name)
    return differing


def refuse_problems(problems: dict[str, list[str]], source, model_name: str) -> None:
    """Raise `WeightLoadingError` naming the counts and the first few names of each problem, if any."""
    found = {kind: names for kind, names in problems.items() if names}
    if not found:
        return
    lines = [
        f"{len(names)} tensor(s) {kind}: {', '.join(names[:_SHOWN])}{', ...' if len(names) > _SHOWN else ''}"
        for kind, names in found.items()
    ]
    raise WeightLoadingError(
        f"{source} does not fill a {model_name}: " + "; ".join(lines) + ". Training from it would start "
        "those weights from random init, so the run is refused. Check that the folder is complete and "
        "was saved from this architecture (save_pretrained of the same model class)"
    )


def check_state_dict(
    model: nn.Module, tensors: dict[str, torch.Tensor], source, *, dropped_prefixes: tuple[str, ...] = ()
) -> None:
    """Load `tensors` into `model` strictly (timm folders), except the task heads under `dropped_prefixes`.

    Raises:
        WeightLoadingError: missing, unexpected or mis-shaped tensors.
    """
    model_state = model.state_dict()
    dropped = sorted(key for key in tensors if key not in model_state and key.startswith(dropped_prefixes))
    problems = {
        "missing from the checkpoint (they would start from random init)": sorted(set(model_state) - set(tensors)),
        "in the checkpoint but not in the model": sorted(set(tensors) - set(model_state) - set(dropped)),
        "of a different shape": [
            f"{key} {tuple(tensors[key].shape)} vs {tuple(model_state[key].shape)}"
            for key in sorted(set(tensors) & set(model_state))
            if tensors[key].shape != model_state[key].shape
        ],
    }
    refuse_problems(problems, source, type(model).__name__)
    model.load_state_dict({key: tensors[key] for key in model_state}, strict=True)
    if dropped:
        logger.warning(
            "%s: %d tensor(s) of a task head are left out, as DINO trains the backbone alone: %s",
            source,
            len(dropped),
            ", ".join(dropped[:_SHOWN]),
        )


__all__ = [
    "WeightLoadingError",
    "check_state_dict",
    "checkpoint_keys",
    "load_checked",
    "on_disk_state_dict",
    "read_tensors",
    "refuse_problems",
    "weight_files",
]
