"""Preemption: the signals a cluster scheduler (or a terminal) sends before it stops a job become a
checkpoint at the end of the current step."""

import signal
import threading

from ..data.loader import STOP_SIGNALS


class PreemptionSignals:
    """Notes SIGTERM and SIGUSR1 (what cluster schedulers send before they stop a job) and SIGINT
    (Ctrl-C) instead of dying on them; the loop then checkpoints at the end of the current step and
    returns. A second SIGINT raises `KeyboardInterrupt` at once, without the checkpoint.

    Schedulers and terminals signal every process of the job; the loader's workers ignore these
    signals (`data.ignore_stop_signals`), so that the main process stops them itself once the
    checkpoint is written. A `| tee` that the same signal stopped takes the run's stdout with it;
    `console.RunConsole` (scripts/pretrain.py) keeps that from stopping the run.

    A context manager: the previous handlers are restored on exit. Outside the main thread (where
    Python cannot install handlers) it does nothing.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT.name:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "PreemptionSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


__all__ = ["PreemptionSignals"]
