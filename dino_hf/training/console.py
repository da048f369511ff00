"""The run's console: what it prints is also written to `OUTPUT_DIR/train.log`, and a terminal that
goes away does not stop the run.

`python scripts/pretrain.py ... | tee train.log` is how runs are logged, and a scheduler's SIGTERM or
a Ctrl-C reaches every process of the job, `tee` included: it exits at once, and the trainer's next
write to the pipe raises `BrokenPipeError` (Python ignores SIGPIPE, so writes fail instead of killing
the process). A closed terminal gives EIO the same way. `RunConsole` puts `ConsoleStream`s in place of
`sys.stdout` and `sys.stderr`: the first failed write to the terminal side marks it dead, and the
output goes on to the log file alone, so that the run reaches its checkpoint and exits with status 0.
"""

import datetime
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import accelerate
import accelerate.state
import huggingface_hub.utils
import transformers
from tqdm.auto import tqdm

LOG_FILE_NAME = "train.log"


def accelerate_main_process() -> bool | None:
    """Whether this is the run's main process; None while the run's Accelerator does not exist yet
    (asking Accelerate earlier would set up its process state before the trainer does, and wrongly:
    a CPU run of several processes is declared by the Accelerator)."""
    if not accelerate.state.is_initialized():
        return None
    return accelerate.PartialState().is_main_process


class RunLog:
    """The log file of a run, written by its main process: whole lines, as a terminal shows them.

    A carriage return starts its line again (a progress bar redraws itself with one), so the file
    keeps a bar's last state, once, when its line ends. Lines printed before `main_process()` knows
    the answer wait in memory. The file, and its folder, are made at the first line after that, and
    appended to: a resumed run goes on in the same file. A failed write (a full disk) stops the log,
    never the run.
    """

    def __init__(self, path: Path, main_process: Callable[[], bool | None] = accelerate_main_process):
        self.path = Path(path)
        self.main_process = main_process
        self.file: TextIO | None = None
        self._waiting: list[str] = []
        self._off = False

    def write_line(self, line: str) -> None:
        if self._off:
            return
        self._waiting.append(line)
        if self.file is None:
            main = self.main_process()
            if main is None:
                return
            if not main:
                self._off, self._waiting = True, []
                return
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
            self.file.write("".join(self._waiting))
            self.file.flush()
        except (OSError, ValueError):
            self._off = True
        self._waiting = []

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


class ConsoleStream:
    """A text stream that stands for `sys.stdout` or `sys.stderr`: each write goes to `terminal` (the
    process's own stream) and, line by line, to `log`.

    The first write or flush error on the terminal side (`BrokenPipeError` when the reader of a pipe
    exited, EIO from a closed terminal, a closed file) marks the terminal dead: later writes go to the
    log alone and nothing raises. Attributes it does not define are the terminal stream's.
    """

    def __init__(self, terminal: TextIO, log: RunLog | None = None):
        self.terminal = terminal
        self.log = log
        self.terminal_alive = True
        self._line = ""
        self._lock = threading.RLock()  # the Hub uploads log from their own thread
        _STREAMS.add(self)

    def write(self, text: str) -> int:
        with self._lock:
            if self.terminal_alive:
                self._to_terminal(text)
            if self.log is not None:
                self._log(text)
        return len(text)

    def _to_terminal(self, text: str) -> None:
        try:
            try:
                self.terminal.write(text)
            except UnicodeEncodeError:  # a character the terminal's encoding lacks: replaced there only
                encoding = self.terminal.encoding or "ascii"
                self.terminal.write(text.encode(encoding, "replace").decode(encoding))
            if "\n" in text:
                self.terminal.flush()
        except (OSError, ValueError):
            self.terminal_alive = False

    def _log(self, text: str) -> None:
        *lines, self._line = (self._line + text).split("\n")
        for line in lines:
            self.log.write_line(line.rsplit("\r", 1)[-1] + "\n")
        self._line = self._line.rsplit("\r", 1)[-1]

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self.terminal_alive:
                try:
                    self.terminal.flush()
                except (OSError, ValueError):
                    self.terminal_alive = False

    def end_line(self) -> None:
        """Write an unfinished last line (a progress bar's) to the log."""
        with self._lock:
            if self.log is not None and self._line:
                self.log.write_line(self._line + "\n")
            self._line = ""

    def isatty(self) -> bool:
        if not self.terminal_alive:
            return False
        try:
            return self.terminal.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.terminal.fileno()

    def __getattr__(self, name):
        if name == "terminal":  # not set yet (a copy being made): no terminal to ask
            raise AttributeError(name)
        return getattr(self.terminal, name)


# A DataLoader worker forked while another thread wrote would find the lock held forever.
_STREAMS: "weakref.WeakSet[ConsoleStream]" = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    for stream in _STREAMS:
        stream._lock = threading.RLock()


os.register_at_fork(after_in_child=_new_locks_after_fork)


class RunConsole:
    """`sys.stdout` and `sys.stderr` as `ConsoleStream`s while it is entered; `log_to(path)` starts
    the log file.

    Python's logging handlers that hold the original streams (transformers', datasets', the Hub's)
    are pointed at the console streams too: a handler whose write fails prints a traceback to
    `sys.stderr`, which would fill the log with "--- Logging error ---". On exit the original
    streams come back; a stream whose terminal died has its file descriptor pointed at /dev/null
    first, so that the interpreter's last flush at exit finds nothing to fail on (it would print
    "Exception ignored ... BrokenPipeError" and turn the exit status into 120).
    """

    def __init__(self):
        self.stdout: ConsoleStream | None = None
        self.stderr: ConsoleStream | None = None
        self.log: RunLog | None = None
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []

    def __enter__(self) -> "RunConsole":
        self.stdout, self.stderr = ConsoleStream(sys.stdout), ConsoleStream(sys.stderr)
        originals = {id(self.stdout.terminal): self.stdout, id(self.stderr.terminal): self.stderr}
        sys.stdout, sys.stderr = self.stdout, self.stderr
        for handler in _stream_handlers():
            # Handlers that look the stream up on each write (logging's last resort, torch's) have no
            # `stream` of their own and already find the console streams.
            stream = handler.__dict__.get("stream")
            if id(stream) in originals:
                self._handlers.append((handler, stream))
                handler.setStream(originals[id(stream)])
        return self

    def log_to(self, path: Path) -> None:
        """Write what the run prints to `path` from now on, from its next line."""
        self.log = RunLog(path)
        self.stdout.log = self.stderr.log = self.log

    def drop_unstarted_log(self) -> None:
        """Forget the log if it has no line yet, so that it makes no file or folder: a run refused for
        a setting leaves its output folder as it found it."""
        if self.log is not None and self.log.file is None:
            self.log = self.stdout.log = self.stderr.log = None

    def __exit__(self, *exc_info) -> None:
        for stream in (self.stdout, self.stderr):
            stream.end_line()
            stream.flush()
            if not stream.terminal_alive:
                _point_at_devnull(stream.terminal)
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
        sys.stdout, sys.stderr = self.stdout.terminal, self.stderr.terminal
        if self.log is not None:
            self.log.close()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [
        handler
        for logger in loggers
        for handler in getattr(logger, "handlers", ())
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


def _point_at_devnull(stream: TextIO) -> None:
    """Send what is left in `stream`'s buffer, and anything written later, to /dev/null."""
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    finally:
        os.close(devnull)
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


class PlainProgress:
    """The progress of the training loop where the output is no terminal (a pipe, a file): a plain line
    at each logging step (when the loop sets the postfix) instead of a bar redrawn with carriage returns,
    which a pipe or a file keeps as one long smear. It takes the calls that the loop makes of a tqdm bar."""

    def __init__(self, total: int, initial: int = 0, disable: bool = False, desc: str = "", file=None, **_):
        self.total, self.n, self.disable, self.desc = total, initial, disable, desc
        self.file = file
        self._start, self._start_n = time.monotonic(), initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **_) -> None:
        if self.disable:
            return
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        percent = 100 * self.n / max(self.total, 1)
        line = f"{self.desc}: {self.n}/{self.total} steps ({percent:.0f}%), {_clock(elapsed)} elapsed"
        if done:
            line += f", {_clock(elapsed / done * (self.total - self.n))} left"
        print(line, file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_bar(total: int, initial: int = 0, disable: bool = False, desc: str = "", **options):
    """A tqdm bar where stderr is a terminal (or a notebook shows the bar), else a `PlainProgress`."""
    in_notebook = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)  # tqdm.auto's choice
    if in_notebook or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, disable=disable, desc=desc, **options)
    return PlainProgress(total, initial, disable, desc)


def quiet_transformers_progress() -> None:
    """Turn off transformers' own progress bars: "Writing model shards", drawn at every
    `save_pretrained` (each checkpoint's teacher export and the final one, for DinoModel and
    transformers backbones), is noise around the run's own progress bar. The Hub's download and
    upload bars stay as they were."""
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()


__all__ = [
    "LOG_FILE_NAME",
    "ConsoleStream",
    "PlainProgress",
    "RunConsole",
    "RunLog",
    "accelerate_main_process",
    "progress_bar",
    "quiet_transformers_progress",
]
