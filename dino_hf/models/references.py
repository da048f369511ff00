"""How a model is named on the command line and in the API: Hub ids, timm names, timm folders.

One home for each rule, so that training, evaluation, conversion and the model card agree on what
`org/name`, `timm:NAME` or a folder means.
"""

import json
import os
from pathlib import Path

# `timm:NAME` names a timm model (its architecture, or its pretrained weights where asked for).
TIMM_PREFIX = "timm:"
# timm names that point at weights outside timm's registry: a Hub repository or a local folder.
TIMM_EXTERNAL_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")

_HUB_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def is_hub_id(name: str, *, allow_bare_name: bool = False) -> bool:
    """Whether `name` reads as a Hub repository id and is not an existing local path.

    `org/name` made of the characters the Hub allows (letters, digits, `-`, `_`, `.`), no part
    starting with a dot; with `allow_bare_name`, also `name` alone (a repository in the user's own
    namespace, as `--hub_model_id` takes).
    """
    parts = str(name).split("/")
    counts = (1, 2) if allow_bare_name else (2,)
    return (
        len(parts) in counts
        and all(part and set(part) <= _HUB_ID_CHARACTERS and not part.startswith(".") for part in parts)
        and not os.path.exists(name)
    )


def missing_local_path(name: str) -> bool:
    """Whether `name` reads as a local path that does not exist: it starts with `/`, `./`, `../` or `~`, or
    its first part is an existing folder here (`models/nope` where `models/` exists), and nothing is there."""
    name = str(name)
    if os.path.exists(os.path.expanduser(name)):
        return False
    first = name.split("/", 1)[0]
    return name.startswith(("/", "./", "../", "~")) or ("/" in name and bool(first) and os.path.isdir(first))


def unreachable_model_message(flag: str, name: str, error: BaseException) -> str:
    """One line for a model that could not be read from the Hub (no connection, offline mode, no such
    repository), saying what to do."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    where = "offline (HF_HUB_OFFLINE is set) and it is not in the local cache" if offline else f"it failed: {reason}"
    return (
        f"{flag} {name}: no local folder of that name, and reading it from the Hugging Face Hub did not work "
        f"({where}). Check the path or the id; to work offline, download it once where the Hub is reachable "
        f"(`hf download {name.removeprefix(TIMM_PREFIX)} --local-dir DIR`) and pass DIR"
    )


def is_timm_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a model saved by timm (`config.json` with an `architecture`)."""
    config_file = Path(folder) / "config.json"
    return config_file.is_file() and "architecture" in json.loads(config_file.read_text())


def is_external_timm_name(name: str) -> bool:
    """Whether a timm model name (after `timm:`) points at a Hub repository or a local folder."""
    return name.startswith(TIMM_EXTERNAL_PREFIXES)


__all__ = [
    "TIMM_EXTERNAL_PREFIXES",
    "TIMM_PREFIX",
    "is_external_timm_name",
    "is_hub_id",
    "is_timm_folder",
    "missing_local_path",
    "unreachable_model_message",
]
