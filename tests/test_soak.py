"""Soak test: a CPU run killed (SIGKILL) again and again at random moments, each time resumed with
`--resume_from_checkpoint latest`, must end exactly where an uninterrupted run ends: the same
teacher, the same batches at every step, and the same logged schedules and losses at every step."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_pretrain_script import ENV, SCRIPT, arguments, assert_same_teacher, read_ids, teacher

from dino_hf.run_files.checkpoints import check_checkpoint, list_checkpoints

STEPS = 24
LONG = ["--num_train_epochs", "6", "--checkpointing_steps", "3"]  # 4 steps per epoch, after TINY's flags
LOG_LINE = re.compile(r"^step (\d+) (epoch .*?) images_per_second=\S+(.*)$", re.MULTILINE)


def command(data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, *arguments(data, output_dir, *LONG, *extra)]


def logged_steps(stdout: str) -> dict[int, str]:
    """step -> its log line without the speed figure (epoch, loss, schedules, diagnostics)."""
    return {int(m.group(1)): m.group(2) + m.group(3) for m in LOG_LINE.finditer(stdout)}


@pytest.mark.slow
def test_runs_killed_at_random_moments_end_like_an_uninterrupted_run(data, tmp_path):  # noqa: F811
    reference = subprocess.run(
        command(data, tmp_path / "reference"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected_logs = logged_steps(reference.stdout)
    assert sorted(expected_logs) == list(range(1, STEPS + 1))

    out = tmp_path / "soak"
    rng = np.random.default_rng(0)
    logs: dict[int, str] = {}
    resumed_at = []
    kills = 0
    for attempt in range(12):
        extra = ("--resume_from_checkpoint", "latest") if attempt else ()
        process = subprocess.Popen(
            command(data, out, *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if kills < 5:
            # Kill at a random moment once the run has started training (after its first checkpoint
            # of this attempt, or a random delay after start).
            before = {p.name for p in list_checkpoints(out / "checkpoints")}
            deadline = time.monotonic() + 120
            delay = rng.uniform(0.0, 1.5)
            while process.poll() is None and time.monotonic() < deadline:
                now = {p.name for p in list_checkpoints(out / "checkpoints")}
                if now - before or any((out / "checkpoints").glob(".checkpoint-*.tmp")):
                    time.sleep(delay)
                    break
                time.sleep(0.01)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        stdout, stderr = process.communicate(timeout=600)
        logs.update(logged_steps(stdout))
        resumed = re.search(r"resumed from .*checkpoint-(\d+) at step (\d+)", stdout)
        if resumed:
            assert resumed.group(1) == resumed.group(2)
            resumed_at.append(int(resumed.group(2)))
        for folder in list_checkpoints(out / "checkpoints"):
            check_checkpoint(folder)  # whenever it was killed, no partial checkpoint is left under a final name
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr[-3000:]
    else:
        pytest.fail("the run did not finish after 12 attempts")

    assert kills >= 3, "the run finished before it could be interrupted often enough"
    assert resumed_at == sorted(resumed_at) and all(step % 3 == 0 for step in resumed_at)
    assert logs == expected_logs  # the step counter, the schedules and the losses line up at every step
    assert read_ids(tmp_path / "soak.jsonl") == read_ids(tmp_path / "reference.jsonl")  # the same batches
    assert_same_teacher(teacher(out, STEPS), teacher(tmp_path / "reference", STEPS))
