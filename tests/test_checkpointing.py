import errno
import json
import logging
import os
import pickle
import random
import resource
import signal

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dino_hf.run_files import checkpoints as checkpointing
from dino_hf.run_files.checkpoints import (
    CheckpointError,
    check_checkpoint,
    finalize,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    staging_dir,
    write_error_advice,
    write_process_state,
    write_shared_state,
)
from dino_hf.training.preemption import PreemptionSignals


def write_checkpoint(checkpoints_dir, step, num_processes=1, total_limit=10):
    """A small but complete checkpoint of `step`, written the way the trainer writes one."""
    staging = staging_dir(checkpoints_dir, step)
    staging.mkdir(parents=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    write_shared_state(
        staging,
        student_state={"w": torch.full((2, 3), float(step))},
        teacher_state={"w": torch.full((2, 3), step + 0.5)},
        loss_state={"center": torch.arange(4.0).view(1, 4) * step},
        optimizer_state=optimizer.state_dict(),
        scaler_state=None,
        trainer_state={"global_step": step, "num_processes": num_processes},
        training_args={"out_dim": 4},
    )
    (staging / "teacher_backbone").mkdir()
    (staging / "teacher_backbone" / "model.safetensors").write_bytes(b"exported weights")
    for rank in range(num_processes):  # last: the RNG states are those the caller continues with
        write_process_state(staging, rank, {"epoch": step, "loader": {"position": 10 * step + rank}})
    return finalize(staging, checkpoints_dir, step, total_limit)


def test_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    folder = write_checkpoint(tmp_path, 4)
    expected = (random.random(), np.random.rand(), torch.rand(3))  # draws right after the state was saved
    assert folder == tmp_path / "checkpoint-4"
    assert not staging_dir(tmp_path, 4).exists()
    check_checkpoint(folder)
    assert set(json.loads((folder / "manifest.json").read_text())) == {
        "student.safetensors",
        "teacher.safetensors",
        "dino_loss.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "training_args.json",
        "rng_state_0.pt",
        "data_state_0.pt",
        "teacher_backbone/model.safetensors",
    }

    state = load_checkpoint(folder, rank=0)
    assert torch.equal(state["teacher"]["w"], torch.full((2, 3), 4.5))
    assert torch.equal(state["dino_loss"]["center"], torch.tensor([[0.0, 4.0, 8.0, 12.0]]))
    assert state["optimizer"]["state"][0]["step"] == 1
    assert state["data"] == {"epoch": 4, "loader": {"position": 40}}
    assert state["trainer_state"] == {"global_step": 4, "num_processes": 1}
    assert state["scaler"] is None
    checkpointing.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_rotation_keeps_the_last_k_and_drops_stale_staging(tmp_path):
    (staging_dir(tmp_path, 99)).mkdir()  # left by a run killed while writing
    for step in (2, 4, 6, 10):
        write_checkpoint(tmp_path, step, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-10"]  # numeric order
    assert not staging_dir(tmp_path, 99).exists()


def test_same_step_saved_again_replaces_the_folder_whole(tmp_path):
    write_checkpoint(tmp_path, 4)
    (tmp_path / "checkpoint-4" / "stray.txt").write_text("from the first write")
    write_checkpoint(tmp_path, 4)
    check_checkpoint(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-4" / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: _truncate(f / "teacher.safetensors"), "teacher.safetensors has"),
        (lambda f: _truncate(f / "optimizer.pt"), "optimizer.pt has"),
        (lambda f: (f / "rng_state_1.pt").unlink(), "rng_state_1.pt is missing"),
        (lambda f: (f / "data_state_0.pt").unlink(), "data_state_0.pt is missing"),
        (lambda f: (f / "teacher_backbone" / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing or unreadable"),
        (
            lambda f: (f / "student.safetensors").write_bytes(b"\xff" * (f / "student.safetensors").stat().st_size),
            "student.safetensors is unreadable",
        ),
    ],
)
def test_damaged_newest_checkpoint_is_named_and_the_previous_used(tmp_path, caplog, damage, named):
    output_dir = tmp_path / "run"
    write_checkpoint(output_dir / "checkpoints", 2, num_processes=2)
    newest = write_checkpoint(output_dir / "checkpoints", 4, num_processes=2)
    damage(newest)
    with pytest.raises(CheckpointError, match=named):
        check_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="dino_hf.run_files.checkpoints"):
        chosen = find_resume_checkpoint(output_dir, "latest")
    assert chosen == output_dir / "checkpoints" / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and named in caplog.text
    with pytest.raises(CheckpointError, match=named):  # named explicitly: refused, not replaced
        find_resume_checkpoint(output_dir, str(newest))


def test_no_valid_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path, "latest") is None
    only = write_checkpoint(tmp_path / "checkpoints", 2)
    (only / "teacher.safetensors").unlink()
    assert find_resume_checkpoint(tmp_path, "latest") is None
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .* does not exist"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "checkpoint-7"))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_carrying_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_checkpoint(tmp_path / "checkpoints", 2)
    payload = folder / "optimizer.pt"
    payload.write_bytes(pickle.dumps(_RunsCode(), protocol=2))
    sizes = json.loads((folder / "manifest.json").read_text())
    sizes["optimizer.pt"] = payload.stat().st_size  # a consistent manifest: only the content is hostile
    (folder / "manifest.json").write_text(json.dumps(sizes))
    with pytest.raises(CheckpointError, match="optimizer.pt is unreadable"):
        check_checkpoint(folder)
    with pytest.raises(Exception):
        load_checkpoint(folder, rank=0)
    assert not (tmp_path / "pwned").exists()


FULL = "is full or over quota: free space on it"


@pytest.mark.parametrize(
    "error, advice",
    [
        (OSError(errno.ENOSPC, "No space left on device"), FULL),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), FULL),
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), FULL),
        (OSError(errno.EACCES, "Permission denied"), "make {folder} writable"),
        (OSError(errno.EROFS, "Read-only file system"), "make {folder} writable"),
        (OSError(errno.EFBIG, "File too large"), "raise the limit"),
        (
            RuntimeError("DataLoader worker (pid 12) is killed by signal: Terminated."),
            "remove the cause of that error",
        ),
        (OSError("another process could not write its part of the checkpoint"), "remove the cause of that error"),
    ],
)
def test_write_error_advice_follows_the_error(tmp_path, error, advice):
    got = write_error_advice(error, tmp_path)
    assert advice.format(folder=tmp_path) in got
    if advice != FULL:
        assert "space" not in got and "full" not in got
    if "writable" not in advice:
        assert "writable" not in got


def test_write_error_advice_reads_the_errors_that_writes_raise(tmp_path):
    """Past a file size limit (EFBIG), as a full disk: safetensors names the OS error in its
    message, a plain write carries its errno, torch.save's error carries neither and gets no guess."""
    writes = {
        "safetensors": lambda path: save_file({"w": torch.zeros(100_000)}, path),
        "write_bytes": lambda path: path.write_bytes(bytes(400_000)),
        "torch.save": lambda path: torch.save({"w": torch.zeros(100_000)}, path),
    }
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    errors = {}
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, limits[1]))
        for name, write in writes.items():
            with pytest.raises(checkpointing.WRITE_ERRORS) as raised:
                write(tmp_path / name)
            errors[name] = raised.value
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert "raise the limit" in write_error_advice(errors["safetensors"], tmp_path)
    assert "raise the limit" in write_error_advice(errors["write_bytes"], tmp_path)
    assert write_error_advice(errors["torch.save"], tmp_path) == "remove the cause of that error"


def test_preemption_signals_are_noted_and_a_second_ctrl_c_interrupts():
    before = {signum: signal.getsignal(signum) for signum in PreemptionSignals.SIGNALS}
    with PreemptionSignals() as signals:
        received = []
        for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.raise_signal(signum)
            received.append(signals.received)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert received == ["SIGUSR1", "SIGTERM", "SIGINT"]
    assert {signum: signal.getsignal(signum) for signum in PreemptionSignals.SIGNALS} == before
