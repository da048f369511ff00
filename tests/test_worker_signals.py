"""The loader's workers and the signals that stop a run: a signal sent to the whole job while a worker starts
(before its `worker_init_fn`, `ignore_stop_signals`, runs) waits for it, rather than ending the worker."""

import multiprocessing
import os
import signal
import subprocess
import time

import pytest

from dino_hf.data.loader import STOP_SIGNALS, ignore_stop_signals, starting_workers

pytestmark = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers take signals by sigwaitinfo")


def _worker(main_process: int) -> None:
    time.sleep(1.0)  # the worker's start before its worker_init_fn (the loader's own set-up, imports)
    ignore_stop_signals(0, main_process)
    time.sleep(60)


def _start_worker(hold: bool) -> multiprocessing.Process:
    worker = multiprocessing.get_context("fork").Process(target=_worker, args=(os.getpid(),), daemon=True)
    if hold:
        with starting_workers():
            worker.start()
    else:
        worker.start()
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # from another process, as a cluster does
    return worker


def test_a_worker_started_while_the_signals_are_held_outlives_a_signal_to_the_job_and_ends_when_asked():
    exposed = _start_worker(hold=False)
    exposed.join(10)
    assert exposed.exitcode == -signal.SIGTERM  # the window: a worker signalled before its init ends

    held = _start_worker(hold=True)
    held.join(1.5)
    assert held.is_alive()  # the signal waited for its init, which leaves it to the main process
    os.kill(held.pid, signal.SIGTERM)  # from its main process: how the loader ends a worker that hangs
    held.join(10)
    assert held.exitcode == 0


def test_the_main_process_keeps_the_signals_that_arrive_meanwhile_and_its_mask():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with starting_workers():
            assert set(STOP_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == [signal.SIGUSR1]
    assert not set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
