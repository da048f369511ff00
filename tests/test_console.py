"""The run's console (`dino_hf.training.console`): a terminal that goes away is dropped and the log
file gets every line; and what a short CLI run prints: no third-party noise, the user's warning kept.
"""

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dino_hf.training.console import LOG_FILE_NAME, ConsoleStream, RunConsole, RunLog

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def dead_pipe():
    """A text stream on a pipe whose reader has exited, as `| tee` leaves it after the job's SIGTERM.
    On exit what its buffer still holds goes to /dev/null, so that closing it does not fail."""
    read, write = os.pipe()
    os.close(read)
    stream = open(write, "w", buffering=1)  # noqa: SIM115 (closed below)
    try:
        yield stream
    finally:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, write)
        os.close(devnull)
        stream.close()


def main_process_log(path: Path) -> RunLog:
    return RunLog(path, main_process=lambda: True)


def test_a_dead_pipe_is_dropped_and_the_log_gets_every_line(tmp_path):
    with dead_pipe() as unguarded, pytest.raises(BrokenPipeError):
        unguarded.write("what print() meets without the console\n")
    with dead_pipe() as terminal:
        stream = ConsoleStream(terminal, main_process_log(tmp_path / "out" / LOG_FILE_NAME))
        stream.write("networks: DinoModel student and teacher\n")
        assert not stream.terminal_alive
        stream.write("step 1 epoch 0.25 loss=6.1\n")
        stream.flush()
    assert (tmp_path / "out" / LOG_FILE_NAME).read_text() == (
        "networks: DinoModel student and teacher\nstep 1 epoch 0.25 loss=6.1\n"
    )


def test_a_progress_bar_is_logged_once_in_its_last_state(tmp_path):
    terminal = io.StringIO()
    stream = ConsoleStream(terminal, main_process_log(tmp_path / LOG_FILE_NAME))
    written = ["\rDINO:  10%| 1/10", "\rDINO:  20%| 2/10", "\n", "a warning\n", "\rDINO:  30%| 3/10"]
    for text in written:
        stream.write(text)
    stream.end_line()
    assert terminal.getvalue() == "".join(written)  # the terminal gets every redraw
    assert (tmp_path / LOG_FILE_NAME).read_text() == "DINO:  20%| 2/10\na warning\nDINO:  30%| 3/10\n"


def test_the_log_waits_for_the_main_process_answer_and_other_processes_write_none(tmp_path):
    answer = None
    log = RunLog(tmp_path / "out" / LOG_FILE_NAME, main_process=lambda: answer)
    log.write_line("printed before the Accelerator exists\n")
    assert not (tmp_path / "out").exists()
    answer = True
    log.write_line("networks: ...\n")
    log.close()
    again = main_process_log(tmp_path / "out" / LOG_FILE_NAME)  # a resumed run appends
    again.write_line("resumed from ...\n")
    again.close()
    assert (tmp_path / "out" / LOG_FILE_NAME).read_text() == (
        "printed before the Accelerator exists\nnetworks: ...\nresumed from ...\n"
    )

    other = RunLog(tmp_path / "other" / LOG_FILE_NAME, main_process=lambda: False)
    other.write_line("networks: ...\n")
    assert not (tmp_path / "other").exists()


def test_a_logging_handler_holding_the_dead_stderr_writes_through_the_console(tmp_path, monkeypatch):
    """transformers, datasets and the Hub keep the stderr of import time in their handlers; through a
    dead pipe such a handler prints "--- Logging error ---" and a traceback to sys.stderr."""
    library = logging.getLogger("test_console.library")
    monkeypatch.setattr(library, "propagate", False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with dead_pipe() as original:
        monkeypatch.setattr(sys, "stderr", original)
        handler = logging.StreamHandler(sys.stderr)
        library.addHandler(handler)
        try:
            with RunConsole() as console:
                console.log_to(tmp_path / LOG_FILE_NAME)
                console.log.main_process = lambda: True
                assert handler.stream is console.stderr
                library.warning("a library warning")
                print("a line on stdout")
            assert handler.stream is original and sys.stderr is original
        finally:
            library.removeHandler(handler)
    assert (tmp_path / LOG_FILE_NAME).read_text() == "a library warning\na line on stdout\n"


CHILD = """
import sys
from dino_hf.training.console import RunConsole
with RunConsole() as console:
    console.log_to(sys.argv[1])
    console.log.main_process = lambda: True
    for index in range(3):
        print(f"line {index}")
"""


# What a guard that only swallows the write errors leaves: the bytes still buffered for the dead pipe.
SWALLOWING = """
import sys
try:
    print("line 0")
    sys.stdout.flush()
except BrokenPipeError:
    pass
"""


def run_with_dead_stdout(*command: str) -> subprocess.CompletedProcess:
    """`command` with its stdout on a pipe whose reader has exited, stdout buffered as by default."""
    read, write = os.pipe()
    os.close(read)
    env = {name: value for name, value in ENV.items() if name != "PYTHONUNBUFFERED"}
    try:
        return subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(write)


def test_a_dead_stdout_leaves_the_exit_status_0_and_nothing_on_stderr(tmp_path):
    swallowed = run_with_dead_stdout(sys.executable, "-c", SWALLOWING)
    # The interpreter's last flush at exit fails: "Exception ignored ... BrokenPipeError", status 120.
    assert swallowed.returncode == 120 and "BrokenPipeError" in swallowed.stderr

    guarded = run_with_dead_stdout(sys.executable, "-c", CHILD, str(tmp_path / LOG_FILE_NAME))
    assert guarded.returncode == 0 and guarded.stderr == ""
    assert (tmp_path / LOG_FILE_NAME).read_text() == "line 0\nline 1\nline 2\n"


HEAD_WARNING = (
    "has trained weights but no DINO head: the random head's first gradients reach the backbone; "
    "consider --head_warmup_steps"
)


@pytest.mark.slow
def test_a_launched_run_prints_no_third_party_lines_and_keeps_the_users_warning(data, tmp_path):
    """`accelerate launch scripts/pretrain.py` after `accelerate config default` (README): no
    launcher defaults warning, no transformers "Writing model shards" bars; the warning about the
    user's own setting (trained weights, no --head_warmup_steps) shows, on stderr and in the log."""
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}
    configured = subprocess.run(["accelerate", "config", "default"], env=env, capture_output=True, text=True)
    assert configured.returncode == 0, configured.stderr
    tiny = "--global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 64 --head_hidden_dim 32 "
    tiny += "--head_bottleneck_dim 16 --per_device_train_batch_size 4 --dataloader_num_workers 0 "
    tiny += "--samples_per_epoch 8 --shuffle_buffer_size 8 --num_train_epochs 2 --checkpointing_steps 1"
    out = tmp_path / "out"
    command = ["accelerate", "launch", str(REPO / "scripts" / "pretrain.py"), *tiny.split()]
    command += ["--train_dir", str(data / "images"), "--model_name_or_path", str(data / "model")]
    completed = subprocess.run(
        [*command, "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Each of stderr's lines, with a progress bar's redraws split apart: the run's own bar, or the warning.
    lines = [part for line in completed.stderr.splitlines() for part in line.split("\r") if part.strip()]
    others = [line for line in lines if not line.startswith("DINO:")]
    assert len(others) == 1 and HEAD_WARNING in others[0], completed.stderr[-3000:]
    assert "Writing model shards" not in completed.stdout
    log = (out / LOG_FILE_NAME).read_text()
    assert HEAD_WARNING in log and "teacher backbone:" in log
