"""A run logged through a pipe, `scripts/pretrain.py ... 2>&1 | tee FILE`, stopped by SIGTERM to the
whole job as SLURM sends it: `tee` gets the signal too and exits at once, so every later write to the
run's stdout and stderr fails. The run still writes its checkpoint, exits with status 0 and resumes,
and OUTPUT_DIR/train.log holds what it printed, the lines after the pipe broke included. One process
(`python scripts/pretrain.py`) and two (`accelerate launch`, gloo on the CPU).

Every run trains a tiny DinoModel (32 px, hidden 32, 2 layers) on the 24 images of the `data`
fixture: batches of 4, 16 samples per epoch, 25 epochs = 100 steps; the signal comes after step 2.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import accelerate_launch
from runs import pretrain_arguments

from dino_hf.run_files.checkpoints import check_checkpoint, list_checkpoints
from dino_hf.training.console import LOG_FILE_NAME

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SCRIPT = str(TESTS.parent / "scripts" / "pretrain.py")
EXIT_STATUS = str(TESTS / "exit_status.py")
# stdout buffered as by default (no PYTHONUNBUFFERED): what the buffer holds for a dead pipe must not
# fail the interpreter's last flush at exit.
ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
ENV.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
# 100 steps and no periodic checkpoint: the run is still going when the signal comes, and the checkpoint
# it writes then is its only one.
LONG_RUN = {"num_train_epochs": 25, "checkpointing_steps": 1000}
# Lines that a write failing on the way to the console would leave in the log.
FAILURE_MARKS = ("Traceback", "Exception ignored", "--- Logging error ---", "BrokenPipeError")


def arguments(data: Path, output_dir: Path, *extra: str) -> list[str]:
    """`pretrain_arguments` of the LONG_RUN."""
    return pretrain_arguments(data, output_dir, *extra, **LONG_RUN)


def start_piped(command: list[str], copy: Path, env: dict) -> tuple[subprocess.Popen, subprocess.Popen]:
    """`command 2>&1 | tee copy` in a process group of its own, as a shell starts a pipeline: returns
    the run and the reader; the group's id is the reader's pid."""
    reader = subprocess.Popen(["tee", str(copy)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, process_group=0)
    run = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=reader.stdin,
        stderr=subprocess.STDOUT,
        process_group=reader.pid,
    )
    reader.stdin.close()  # the run holds the pipe's only writing end
    return run, reader


def wait_for_line(log: Path, start: str, run: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and any(line.startswith(start) for line in log.read_text().splitlines())):
        assert run.poll() is None, f"the run ended ({run.returncode}) before {start!r} was in {log}"
        assert time.monotonic() < deadline, f"{start!r} did not appear in {log}"
        time.sleep(0.05)


def stop_job(run: subprocess.Popen, reader: subprocess.Popen, log: Path, copy: Path) -> int:
    """SIGTERM to the whole job once step 2 is logged; checks that the reader died of it and that
    the run's stop line reached the log but not the dead pipe; returns the step the run stopped at."""
    wait_for_line(log, "step 2 epoch", run)
    os.killpg(reader.pid, signal.SIGTERM)
    assert reader.wait(timeout=60) == -signal.SIGTERM
    run.wait(timeout=240)
    text = log.read_text()
    stops = [line for line in text.splitlines() if line.startswith("Stopped by SIGTERM after step ")]
    assert len(stops) == 1, text[-3000:]
    assert not any(mark in text for mark in FAILURE_MARKS), text[-3000:]
    assert "Stopped by SIGTERM" not in copy.read_text()  # printed after the pipe broke
    step = int(stops[0].split("after step ")[1].split(";")[0])
    assert 2 <= step < 100
    assert max(int(folder.name.split("-")[1]) for folder in list_checkpoints(log.parent / "checkpoints")) == step
    check_checkpoint(log.parent / "checkpoints" / f"checkpoint-{step}")
    return step


def assert_resumed(completed: subprocess.CompletedProcess, output_dir: Path, step: int) -> None:
    assert completed.returncode == 0, completed.stderr[-3000:]
    resumed = f"resumed from {output_dir / 'checkpoints' / f'checkpoint-{step}'} at step {step}"
    assert resumed in completed.stdout
    log = (output_dir / LOG_FILE_NAME).read_text()
    assert log.count("Stopped by SIGTERM after step ") == 1 and resumed in log  # appended to
    check_checkpoint(output_dir / "checkpoints" / f"checkpoint-{step + 1}")


def test_one_process_piped_through_tee_checkpoints_exits_0_and_resumes(data, tmp_path):
    out = tmp_path / "out"
    run, reader = start_piped([sys.executable, SCRIPT, *arguments(data, out)], tmp_path / "tee.txt", ENV)
    step = stop_job(run, reader, out / LOG_FILE_NAME, tmp_path / "tee.txt")
    assert run.returncode == 0

    resume = arguments(data, out, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 1))
    completed = subprocess.run([sys.executable, SCRIPT, *resume], env=ENV, capture_output=True, text=True, timeout=300)
    assert_resumed(completed, out, step)


def test_two_processes_piped_through_tee_checkpoint_exit_0_and_resume(data, tmp_path):
    """The launcher (torchrun) passes the signal on to its processes and reports it as its own exit
    status; `tests/exit_status.py` keeps how each process ended."""
    out, statuses = tmp_path / "out", tmp_path / "statuses"
    statuses.mkdir()
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "EXIT_STATUS_DIR": str(statuses)}
    command = [*accelerate_launch(2), EXIT_STATUS, *arguments(data, out)]
    run, reader = start_piped(command, tmp_path / "tee.txt", env)
    step = stop_job(run, reader, out / LOG_FILE_NAME, tmp_path / "tee.txt")
    assert {path.name: path.read_text() for path in statuses.iterdir()} == {"status-0": "0", "status-1": "0"}
    last = out / "checkpoints" / f"checkpoint-{step}"
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= {path.name for path in last.iterdir()}

    resume = arguments(data, out, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 1))
    completed = subprocess.run(
        [*accelerate_launch(2), SCRIPT, *resume], env=env, capture_output=True, text=True, timeout=300
    )
    assert_resumed(completed, out, step)
