"""The batches of a run: pass after pass over the stream, resumable, and on the device with the next
one prefetched (and cropped, with --augment_on gpu) while the current step computes."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dino_hf.augment.batch_multicrop import BatchMultiCrop, DecodeAndCap
from dino_hf.augment.multicrop import MultiCropTransform
from dino_hf.data.loader import build_multicrop_dataloader
from dino_hf.data.sources import load_image_stream
from dino_hf.training.batches import DeviceBatches, EndlessBatches
from dino_hf.training.preemption import PreemptionSignals


def loader_over(folder, num_workers=0, transform=None):
    stream, column = load_image_stream(train_dir=str(folder))
    transform = transform or MultiCropTransform(global_crops_size=16, local_crops_size=8, local_crops_number=1)
    return build_multicrop_dataloader(
        stream, column, transform, batch_size=4, num_workers=num_workers, shuffle_buffer_size=5
    )


@pytest.mark.parametrize("stop_after", [3, 4])  # 3: right after the last batch of the first pass
def test_endless_batches_resume_where_they_stopped(tmp_path, stop_after):
    rng = np.random.default_rng(0)
    for index in range(12):  # 3 batches of 4 per pass
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{index:02d}.png")
    batches = EndlessBatches(loader_over(tmp_path))
    for _ in range(stop_after):
        next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    assert state["epoch"] == (0 if stop_after == 3 else 1)
    assert batches.epoch == 2  # the 4 batches after the stop cross into another pass

    resumed = EndlessBatches(loader_over(tmp_path))
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert got["ids"] == want["ids"]
        for got_crop, want_crop in zip(got["crops"], want["crops"]):
            assert torch.equal(got_crop, want_crop)  # the same augmentation, too
    assert resumed.epoch == 2


def test_endless_batches_of_a_too_small_stream(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "only.png")
    with pytest.raises(ValueError, match="gave no complete batch; use a smaller batch or more data"):
        next(EndlessBatches(loader_over(tmp_path)))


def images(folder, count=12):
    rng = np.random.default_rng(0)
    for index in range(count):  # 3 batches of 4 per pass
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")


def device_batches(folder, on_device: bool, prefetch: bool) -> DeviceBatches:
    """The trainer's two ways to crop: in the workers, or on the device from capped images."""
    if on_device:
        loader = loader_over(folder, transform=DecodeAndCap(24))
        multicrop = BatchMultiCrop(global_crops_size=16, local_crops_size=8, local_crops_number=1)
        return DeviceBatches(
            EndlessBatches(loader), torch.device("cpu"), multicrop=multicrop, seed=3, prefetch=prefetch
        )
    return DeviceBatches(EndlessBatches(loader_over(folder)), torch.device("cpu"), prefetch=prefetch)


def assert_same(got, want) -> None:
    (got_crops, got_batch), (want_crops, want_batch) = got, want
    assert got_batch["ids"] == want_batch["ids"]
    assert len(got_crops) == len(want_crops) == 3
    for got_crop, want_crop in zip(got_crops, want_crops):
        assert torch.equal(got_crop, want_crop)


@pytest.mark.parametrize("on_device", [False, True])
def test_prefetched_batches_are_the_serial_ones_in_the_same_order(tmp_path, on_device):
    images(tmp_path)
    serial, prefetched = device_batches(tmp_path, on_device, False), device_batches(tmp_path, on_device, True)
    for _ in range(7):  # more than two passes over the data
        assert_same(next(prefetched), next(serial))
    assert prefetched.step == serial.step == 7


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("stop_after", [2, 3])  # 3: right after the last batch of a pass
def test_prefetched_batches_resume_where_they_stopped(tmp_path, on_device, stop_after):
    images(tmp_path)
    uninterrupted = device_batches(tmp_path, on_device, True)
    for _ in range(stop_after):
        next(uninterrupted)
    state = uninterrupted.state_dict()  # the next batch is already fetched; the position leaves it out
    expected = [next(uninterrupted) for _ in range(4)]
    resumed = device_batches(tmp_path, on_device, True)
    resumed.load_state_dict(state, stop_after)
    for want in expected:
        assert_same(next(resumed), want)


def test_loader_workers_outlive_stop_signals_from_others_but_not_a_sigterm_from_the_main_process(tmp_path):
    """A scheduler signals the loader's workers too: they ignore it. SIGTERM from the main process
    (multiprocessing's way to end workers when it exits on an error) still ends them."""
    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{index:02d}.png")
    others = set(multiprocessing.active_children())
    batches = iter(loader_over(tmp_path, num_workers=1))
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - others
    send = f"import os\nfor signum in {[int(s) for s in PreemptionSignals.SIGNALS]}: os.kill({worker.pid}, signum)"
    subprocess.run([sys.executable, "-c", send], check=True)  # sent by another process, as a scheduler does
    time.sleep(0.5)
    assert worker.is_alive()
    assert len(next(batches)["ids"]) == 4

    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert worker.exitcode == 0
    del batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("on_device", [False, True])
def test_cuda_side_stream_prefetch_gives_the_serial_batches(tmp_path, on_device):
    """On CUDA the prefetched batch is copied and cropped on a side stream: the same crops as the
    serial path, which does the same work on the step's stream."""
    images(tmp_path)
    cuda = torch.device("cuda")

    def on_cuda(prefetch):
        return device_batches(tmp_path, on_device, prefetch, device=cuda)

    serial, prefetched = on_cuda(False), on_cuda(True)
    for _ in range(5):
        assert_same(next(prefetched), next(serial))
