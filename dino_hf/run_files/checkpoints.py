"""Training checkpoints: written atomically, validated on resume, rotated.

A checkpoint is a folder `checkpoint-<step>` holding every tensor in safetensors and the rest in JSON
or in `torch.save` files of plain tensors and numbers that `torch.load(weights_only=True)` reads back
(no arbitrary unpickling, unlike a pickled training state). It is first written under a temporary
name and renamed when complete, so a crash during the write never leaves a folder that resume would
take. The last file written is `manifest.json`, the size of every other file; `check_checkpoint`
compares the folder with it (a missing or truncated file is named) and reads each state file, and
`find_resume_checkpoint` falls back to the previous checkpoint when the newest is damaged.

Files: `student.safetensors`, `teacher.safetensors` (the EMA network: the DINO teacher, or the EMA student
of a distillation run; a distillation run without one writes none), `dino_loss.safetensors` (the center;
only with the DINO loss), `optimizer.pt` (its state keyed by parameter name), `scaler.pt` (fp16 only),
`rng_state_<rank>.pt` and `data_state_<rank>.pt` (one per process: its RNG states and its position in the data stream),
`trainer_state.json` (step, counters, `num_processes`), `training_args.json` (the resolved
configuration, without secrets), `teacher_backbone/` (the exported model folder) and
`manifest.json`; with anchoring on, also `gram_teacher.safetensors` (the Gram teacher: the frozen
starting backbone or the EMA teacher's last snapshot, with the step it was taken at, `snapshot_step`;
`dino_hf.objectives.anchor`; optional, so checkpoints without it load); with iBOT on, also
`ibot_loss.safetensors` (the patch center, `dino_hf.objectives.ibot`; optional likewise); with
distillation, `distillation.safetensors` (the queue of the global term, and in its metadata the name and
weight hash of the frozen model, never its weights; `dino_hf.objectives.distillation`); with LoRA,
`lora_base.json` (the base's name and weight hash; the weight files then hold no frozen base weight, and
the checkpoint's exports are the merged `teacher_backbone/` and the peft adapter `teacher_adapter/`;
`dino_hf.models.lora`). Weights and
optimiser state are whole (gathered from the shards under FSDP, `dino_hf.training.sharding`), so a
checkpoint resumes with any number of processes and under FSDP or not. What goes into the files is gathered by
`dino_hf.run_files.writer`; the data position by `dino_hf.training.batches.EndlessBatches`.
"""

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
REQUIRED_FILES = ("student.safetensors", "optimizer.pt", "trainer_state.json", "training_args.json")
# The EMA network and the DINO loss's center, written by the runs that have them (not a distillation run without
# the DINO loss and without an EMA student).
TEACHER_FILE, DINO_LOSS_FILE = "teacher.safetensors", "dino_loss.safetensors"
MANIFEST = "manifest.json"
# The anchor's weights and snapshot step (`dino_hf.objectives.anchor.Anchor`), written only by runs with
# anchoring on.
ANCHOR_FILE = "gram_teacher.safetensors"
# iBOT's loss state, the patch center (`dino_hf.objectives.ibot.IBotLoss`), written only by runs with iBOT on.
IBOT_FILE = "ibot_loss.safetensors"
# Distillation's state, the queue, with the frozen model's name and hash as metadata (distillation runs only).
DISTILL_FILE = "distillation.safetensors"
# A LoRA run's base: its name and the sha256 of its frozen weights (`dino_hf.models.lora`), which the
# checkpoint's weight files leave out.
LORA_FILE = "lora_base.json"
# What a failed write raises (a full disk, a read-only folder, a file size limit): OSError from open
# and write, RuntimeError from torch.save, SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or unreadable."""


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) names the OS error it got


def write_error_advice(error: BaseException, folder: Path) -> str:
    """What to do about `error`, one of WRITE_ERRORS raised while writing a checkpoint under `folder`.

    A full disk or quota, a folder that cannot be written and a file size limit are told apart by
    the error's errno: an OSError's own, or the `(os error N)` in a safetensors message. Any other
    error (torch.save's carry no errno) gets no guess: its cause is to be removed."""
    code = getattr(error, "errno", None)
    if code is None and (found := _OS_ERROR_CODE.search(str(error))):
        code = int(found.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk of {folder} is full or over quota: free space on it"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {folder} writable"
    if code == errno.EFBIG:
        return "a file is over the size limit of the file system or of this process (`ulimit -f`): raise the limit"
    return "remove the cause of that error"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def rng_state() -> dict:
    """Python, numpy and torch generator states as plain tensors and numbers."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "numpy_name": np_name,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back the Python, numpy and torch generator states saved by `rng_state`."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_manifest(folder: Path) -> None:
    sizes = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    """The temporary folder a checkpoint is written to before it is renamed into place."""
    return checkpoints_dir / f".checkpoint-{step}.tmp"


def write_shared_state(
    folder: Path,
    *,
    student_state: dict,
    teacher_state: dict | None,
    loss_state: dict | None,
    optimizer_state: dict,
    scaler_state: dict | None,
    trainer_state: dict,
    training_args: dict,
    anchor_state: dict | None = None,
    ibot_state: dict | None = None,
    distill_state: tuple[dict, dict] | None = None,
    lora_base: dict | None = None,
) -> None:
    """Write the state that all processes share (called on the main process only); `teacher_state` and
    `loss_state`: the EMA network's weights and the DINO loss's center, when the run has them; `anchor_state`: the
    anchor's weights, when the run has one; `ibot_state`: the iBOT loss's (its patch center), likewise;
    `distill_state`: distillation's tensors and the metadata that names its frozen model; `lora_base`: the
    name and hash of a LoRA run's base (its weights are then left out of the weight files)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(student_state), folder / "student.safetensors")
    if teacher_state is not None:
        save_file(_contiguous(teacher_state), folder / TEACHER_FILE)
    if loss_state is not None:
        save_file(_contiguous(loss_state), folder / DINO_LOSS_FILE)
    torch.save(optimizer_state, folder / "optimizer.pt")
    if scaler_state is not None:
        torch.save(scaler_state, folder / "scaler.pt")
    if anchor_state is not None:
        save_file(_contiguous(anchor_state), folder / ANCHOR_FILE)
    if ibot_state is not None:
        save_file(_contiguous(ibot_state), folder / IBOT_FILE)
    if distill_state is not None:
        tensors, metadata = distill_state
        save_file(_contiguous(tensors), folder / DISTILL_FILE, metadata=metadata)
    if lora_base is not None:
        (folder / LORA_FILE).write_text(json.dumps(lora_base, indent=2, sort_keys=True) + "\n")
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
    (folder / "training_args.json").write_text(json.dumps(training_args, indent=2, sort_keys=True) + "\n")


def write_process_state(folder: Path, rank: int, data_state: dict | None) -> None:
    """Write what differs per process: its RNG states and its position in the data stream."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / f"rng_state_{rank}.pt")
    if data_state is not None:
        torch.save(data_state, folder / f"data_state_{rank}.pt")


def finalize(staging: Path, checkpoints_dir: Path, step: int, total_limit: int) -> Path:
    """Make a fully written staging folder the checkpoint of `step`: write its manifest, flush it to
    disk, rename it into place; then keep only the last `total_limit` checkpoints and remove stale
    staging folders. A crash at any point leaves either the old checkpoints or the new one complete."""
    _write_manifest(staging)
    _fsync_tree(staging)
    final = checkpoints_dir / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
        replaced = checkpoints_dir / f".checkpoint-{step}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(checkpoints_dir)
    for stale in checkpoints_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def check_checkpoint(folder: Path) -> None:
    """Raise `CheckpointError` naming the first missing, truncated or unreadable file of `folder`."""
    manifest = folder / MANIFEST
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{manifest} is missing or unreadable ({error}): the checkpoint is incomplete"
        ) from error
    for name in REQUIRED_FILES:
        if name not in sizes:
            raise CheckpointError(f"{manifest} does not list {name}: the checkpoint is incomplete")
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, {size} were written: it is damaged")
    weight_files = ["student.safetensors"]
    weight_files += [
        name for name in (TEACHER_FILE, DINO_LOSS_FILE, ANCHOR_FILE, IBOT_FILE, DISTILL_FILE) if name in sizes
    ]
    for name in weight_files:
        try:
            with safe_open(folder / name, framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except Exception as error:  # safetensors raises several types for a damaged header
            raise CheckpointError(f"{folder / name} is unreadable: {error}") from error
    for name in ("trainer_state.json", "training_args.json"):
        try:
            json.loads((folder / name).read_text())
        except ValueError as error:
            raise CheckpointError(f"{folder / name} is not valid JSON: {error}") from error
    num_processes = json.loads((folder / "trainer_state.json").read_text()).get("num_processes", 1)
    per_process = [f"{kind}_{rank}.pt" for rank in range(num_processes) for kind in ("rng_state", "data_state")]
    for name in ["optimizer.pt", *per_process]:
        try:
            torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as error:  # a missing file, a truncated zip archive (RuntimeError, EOFError), ...
            raise CheckpointError(f"{folder / name} is unreadable: {error}") from error


def find_resume_checkpoint(output_dir: Path, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from: `"latest"` is the newest valid one under
    `output_dir/checkpoints` (damaged ones are reported and skipped; None when there is none), a path
    is checked and used as it is."""
    if resume_from_checkpoint != "latest":
        folder = Path(resume_from_checkpoint)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {folder} does not exist; pass a checkpoint-<step> folder or 'latest'"
            )
        check_checkpoint(folder)
        return folder
    for folder in reversed(list_checkpoints(Path(output_dir) / "checkpoints")):
        try:
            check_checkpoint(folder)
        except CheckpointError as error:
            logger.warning("skipping the damaged checkpoint %s: %s", folder, error)
            continue
        return folder
    return None


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a complete checkpoint by its layout (its manifest is there); `check_checkpoint`
    reads the files."""
    return (Path(folder) / MANIFEST).is_file()


def checkpoint_holding(path: Path) -> Path | None:
    """The checkpoint that `path` is part of (one of its files, its `teacher_backbone` export or a
    file of it), or None."""
    for parent in Path(path).absolute().parents[:2]:
        if is_checkpoint(parent):
            return parent
    return None


def checkpoints_of_run(folder: Path) -> list[Path]:
    """The complete checkpoints of the run whose output folder (or `checkpoints` folder) is `folder`,
    oldest first."""
    folder = Path(folder)
    for candidate in (folder / "checkpoints", folder):
        found = [path for path in list_checkpoints(candidate) if is_checkpoint(path)]
        if found:
            return found
    return []


def _run_of(path: Path, output_dir: Path) -> Path:
    """The run folder whose checkpoints a refusal about `path` lists: the one `path` is in, else
    `output_dir`."""
    for folder in (path, *path.absolute().parents[:3]):
        if checkpoints_of_run(folder):
            return folder
    return Path(output_dir)


def _not_a_checkpoint(path: Path, flag: str) -> str:
    """What `path`, which is no checkpoint and no run folder, is instead."""
    if not path.exists():
        return "does not exist"
    if path.is_file():
        return "is a file"
    if (path / "config.json").is_file():
        what = "is an exported model folder (a backbone, without the head, center and optimiser of a checkpoint)"
        if flag == "init_from_checkpoint":
            what += "; to start from that backbone alone pass it as --model_name_or_path"
        return what
    if any((path / name).is_file() for name in REQUIRED_FILES):
        return f"is an incomplete checkpoint (no {MANIFEST}: its write did not finish)"
    return f"is not a checkpoint (it has no {MANIFEST}, {', '.join(REQUIRED_FILES[:3])}, ...)"


def named_checkpoint(
    path: str | Path, flag: str, *, output_dir: Path, run_folder_means_latest: bool = False, also_accepted: str = ""
) -> Path:
    """The checkpoint folder that `--flag` names by `path`, judged by its layout (the files are read
    when it is loaded). With `run_folder_means_latest`, a run's output folder (or its `checkpoints`
    folder) stands for its newest complete checkpoint. `also_accepted`: what else the flag takes, for
    the message.

    Raises:
        ValueError: `path` is a file or the export of a checkpoint (the message names the checkpoint),
            missing, another file, an exported model folder, a run's output folder (without
            `run_folder_means_latest`), a checkpoint whose write did not finish, or any other folder;
            the message lists the checkpoints of the run `path` is in, else of `output_dir`.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    holder = checkpoint_holding(path)
    if holder is not None:
        part = "the exported teacher backbone" if path.is_dir() else f"the file {path.name}"
        raise ValueError(
            f"--{flag}={str(path)!r} is not valid: it is {part} of the checkpoint {holder}; pass the folder, "
            f"--{flag} {holder}"
        )
    run_checkpoints = checkpoints_of_run(path) if path.is_dir() else []
    if run_checkpoints and run_folder_means_latest:
        return run_checkpoints[-1]
    expected = "a checkpoint-<step> folder that a training run wrote under OUTPUT_DIR/checkpoints"
    if run_folder_means_latest:
        expected += ", or a run's OUTPUT_DIR (its newest checkpoint is taken)"
    if also_accepted:
        expected += f", or {also_accepted}"
    run = _run_of(path, output_dir)
    existing = checkpoints_of_run(run)
    if existing:
        listed = f"the checkpoints under {existing[-1].parent} are {', '.join(p.name for p in existing[-5:])}"
    else:
        listed = f"there is no complete checkpoint under {run / 'checkpoints'}"
    if run_checkpoints:
        what = "is the output folder of a run, not one of its checkpoints"
        listed += f" ('latest' with --output_dir {path} takes the newest)"
    else:
        what = _not_a_checkpoint(path, flag)
    raise ValueError(f"--{flag}={str(path)!r} is not valid: it {what}. It takes {expected}; {listed}")


def _tensors_and_metadata(path: Path) -> tuple[dict, dict] | None:
    """A safetensors file's tensors and metadata; None when it does not exist."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})


def load_checkpoint(folder: Path, rank: int) -> dict:
    """Everything `write_*` wrote, as tensors and plain values (the caller puts them in place)."""
    state = {
        "student": load_file(folder / "student.safetensors"),
        "teacher": load_file(folder / TEACHER_FILE) if (folder / TEACHER_FILE).is_file() else None,
        "dino_loss": load_file(folder / DINO_LOSS_FILE) if (folder / DINO_LOSS_FILE).is_file() else None,
        "optimizer": torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
        "trainer_state": json.loads((folder / "trainer_state.json").read_text()),
        "scaler": None,
        "rng": None,
        "data": None,
        "anchor": load_file(folder / ANCHOR_FILE) if (folder / ANCHOR_FILE).is_file() else None,
        "ibot_loss": load_file(folder / IBOT_FILE) if (folder / IBOT_FILE).is_file() else None,
        "distillation": _tensors_and_metadata(folder / DISTILL_FILE),
        "lora_base": json.loads((folder / LORA_FILE).read_text()) if (folder / LORA_FILE).is_file() else None,
    }
    if (folder / "scaler.pt").is_file():
        state["scaler"] = torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True)
    if (folder / f"rng_state_{rank}.pt").is_file():
        state["rng"] = torch.load(folder / f"rng_state_{rank}.pt", map_location="cpu", weights_only=True)
    if (folder / f"data_state_{rank}.pt").is_file():
        state["data"] = torch.load(folder / f"data_state_{rank}.pt", map_location="cpu", weights_only=True)
    return state


__all__ = [
    "ANCHOR_FILE",
    "DINO_LOSS_FILE",
    "DISTILL_FILE",
    "IBOT_FILE",
    "LORA_FILE",
    "TEACHER_FILE",
    "CheckpointError",
    "WRITE_ERRORS",
    "check_checkpoint",
    "checkpoint_holding",
    "checkpoints_of_run",
    "finalize",
    "find_resume_checkpoint",
    "is_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "named_checkpoint",
    "staging_dir",
    "write_error_advice",
    "write_process_state",
    "write_shared_state",
]
