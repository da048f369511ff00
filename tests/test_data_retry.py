"""Transient stream failures (`dino_hf/stream_errors.py`) in `dino_hf/multicrop_stream.py`: retried from the
block's position, with back-off."""

import errno
import logging
import os
import types
from collections import Counter

import httpx2
import numpy as np
import pytest
import requests
import torch
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from PIL import Image

import dino_hf.data.stream as multicrop_stream
from dino_hf.augment.multicrop import MultiCropTransform
from dino_hf.data.loader import build_multicrop_dataloader
from dino_hf.data.sources import load_image_stream
from dino_hf.data.stream_errors import StreamReadError, is_transient_stream_error

TINY = dict(global_crops_size=32, local_crops_size=16, local_crops_number=2)


class FlakyStream:
    """Wraps a stream; raises `error` when this process has read `fail_at[0]` rows (each entry once,
    counting re-read rows), and on every pass once it has given `fail_every_pass_after` rows."""

    def __init__(self, stream, fail_at=(), fail_every_pass_after=None, error=ConnectionResetError):
        self.stream = stream
        self.fail_at = list(fail_at)
        self.fail_every_pass_after = fail_every_pass_after
        self.error = error
        self.rows_read = 0
        self.num_shards = stream.num_shards
        self.info = stream.info
        self.split = stream.split

    def set_epoch(self, epoch):
        self.stream.set_epoch(epoch)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)

    def __iter__(self):
        for given, row in enumerate(self.stream):
            if self.fail_at and self.rows_read == self.fail_at[0]:
                self.fail_at.pop(0)
                raise self.error(f"connection reset after {self.rows_read} rows")
            if given == self.fail_every_pass_after:
                raise self.error("connection reset, again")
            self.rows_read += 1
            yield row


@pytest.fixture
def folder(tmp_path):
    """20 images in two class folders and 2 bad files (counted as skipped)."""
    for k, name in enumerate(("cat", "dog")):
        os.makedirs(tmp_path / name)
        for i in range(10):
            array = np.random.default_rng(100 * k + i).integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / name / f"{i:03d}.png")
    (tmp_path / "cat" / "zero.png").write_bytes(b"")
    (tmp_path / "dog" / "text.jpg").write_bytes(b"this is not an image")
    return tmp_path


@pytest.fixture
def sleeps(monkeypatch):
    """Records the back-off delays instead of sleeping (in this process)."""
    recorded = []
    monkeypatch.setattr(multicrop_stream, "time", types.SimpleNamespace(sleep=recorded.append))
    return recorded


def run(stream, column, num_workers=0, stop_after=None, state=None, **retry_options):
    loader = build_multicrop_dataloader(
        stream,
        column,
        MultiCropTransform(**TINY),
        batch_size=4,
        num_workers=num_workers,
        shuffle_buffer_size=8,
        drop_last=False,
        **retry_options,
    )
    if state is not None:
        loader.load_state_dict(state)
    ids, crops, skipped, retries = [], [], Counter(), 0
    for batch in loader:
        ids += batch["ids"]
        crops.append(batch["crops"])
        skipped.update(batch["skipped"])
        retries += batch["stream_retries"]
        if len(crops) == stop_after:
            return ids, crops, skipped, retries, loader.state_dict()
    return ids, crops, skipped, retries, None


def assert_same_crops(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_resets_mid_block_are_retried_and_the_samples_are_those_of_an_uninterrupted_run(folder, sleeps, caplog):
    stream, column = load_image_stream(train_dir=str(folder))
    ids, crops, skipped, retries, _ = run(stream, column)
    assert len(ids) == 20 and retries == 0 and skipped == {"zero_byte": 1, "not_an_image": 1}
    # 5 rows into block 0, twice more on re-opening (in a row), then 6 rows into block 1 (22 rows, 8 per block).
    flaky = FlakyStream(stream, fail_at=[5, 5, 5, 19])
    with caplog.at_level(logging.WARNING, logger="dino_hf.data.stream"):
        got = run(flaky, column, retry_delay=1.0, max_retry_delay=1.5)
    assert got[0] == ids and got[2] == skipped and got[3] == 4
    assert_same_crops(got[1], crops)  # augmentations too
    assert sleeps == [1.0, 1.5, 1.5, 1.0]  # 1, 2 and 4 s capped at 1.5; the count restarts after a good block
    warnings = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(warnings) == 4
    assert "ConnectionResetError" in warnings[0] and "block 0" in warnings[0] and "retry 1 of 5 in 1 s" in warnings[0]
    assert "block 1" in warnings[3] and "retry 1 of 5" in warnings[3]
    assert flaky.rows_read == 5 + 8 + 6 + 8 + 6  # the partial blocks that failed are read again


def test_a_failure_when_opening_and_after_a_checkpoint_resume_keeps_the_position(folder, sleeps):
    stream, column = load_image_stream(train_dir=str(folder))
    ids, crops, _, _, _ = run(stream, column)
    first, first_crops, _, _, state = run(stream, column, stop_after=3)  # 12 samples: inside block 1
    assert state["dataset_state"]["block"] == 1 and state["dataset_state"]["anchor"] is not None
    # before the first row of the resumed block, then 3 rows into it: two failures in a row
    rest, rest_crops, _, retries, _ = run(FlakyStream(stream, fail_at=[0, 3]), column, state=state)
    assert first + rest == ids and retries == 2 and sleeps == [1.0, 2.0]
    assert_same_crops(first_crops + rest_crops, crops)


def test_a_permanent_failure_raises_naming_the_source_and_the_attempts(folder, sleeps):
    stream, column = load_image_stream(train_dir=str(folder))
    flaky = FlakyStream(stream, fail_every_pass_after=3)
    with pytest.raises(
        StreamReadError,
        match=r"'generator' \(split train, 22 shards\) failed after 4 attempts in a row "
        r"\(3 retries\) at epoch 0, block 0 .*ConnectionResetError",
    ) as caught:
        run(flaky, column, max_retries=3, retry_delay=0.25)
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert sleeps == [0.25, 0.5, 1.0]
    assert flaky.rows_read == 4 * 3


def test_other_errors_are_not_retried(folder, sleeps):
    stream, column = load_image_stream(train_dir=str(folder))
    with pytest.raises(PermissionError, match="connection reset"):
        run(FlakyStream(stream, fail_at=[2], error=PermissionError), column)
    with pytest.raises(StreamReadError, match="after 1 attempt in a row .0 retries.") as caught:
        run(FlakyStream(stream, fail_at=[2]), column, max_retries=0)  # retries turned off
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert sleeps == []
    with pytest.raises(ValueError, match="max_retries"):
        run(stream, column, max_retries=-1)


def test_with_two_workers_each_retries_its_own_part(folder):
    stream, column = load_image_stream(train_dir=str(folder))
    ids, crops, skipped, _, _ = run(stream, column, num_workers=2)
    # each worker (11 rows) fails 3 rows into its block 0 and 2 rows into its block 1
    got = run(FlakyStream(stream, fail_at=[3, 13]), column, num_workers=2, retry_delay=0.01)
    assert got[0] == ids and got[2] == skipped and got[3] == 4
    assert_same_crops(got[1], crops)


def response(status):
    return httpx2.Response(
        status, request=httpx2.Request("GET", "https://huggingface.co/datasets/x/resolve/main/a.parquet")
    )


def requests_http_error(status):
    reply = requests.Response()
    reply.status_code = status
    return requests.HTTPError(f"{status}", response=reply)


def chained_as(kind, cause):
    try:
        raise kind("reading the parquet file failed") from cause
    except kind as error:
        return error


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (BrokenPipeError(), True),
        (ConnectionError("Server Disconnected"), True),  # what datasets raises when its own retries give up
        (TimeoutError(), True),
        (TimeoutError(), True),
        (OSError(errno.ENETUNREACH, "network is unreachable"), True),
        (httpx2.ReadError("read failed"), True),
        (httpx2.ReadTimeout("timed out"), True),
        (httpx2.RemoteProtocolError("peer closed connection"), True),
        (requests.ConnectionError("reset"), True),
        (requests.exceptions.ChunkedEncodingError("incomplete read"), True),
        (requests_http_error(503), True),
        (requests_http_error(404), False),
        (HfHubHTTPError("503 Service Unavailable", response=response(503)), True),
        (HfHubHTTPError("429 Too Many Requests", response=response(429)), True),
        (HfHubHTTPError("502 Bad Gateway", response=response(502)), True),
        (HfHubHTTPError("401 Unauthorized", response=response(401)), False),
        (HfHubHTTPError("404 Not Found", response=response(404)), False),
        (httpx2.HTTPStatusError("504", request=response(504).request, response=response(504)), True),
        (chained_as(RuntimeError, ConnectionResetError()), True),
        (chained_as(RuntimeError, ValueError("bad table")), False),
        (OfflineModeIsEnabled("HF_HUB_OFFLINE=1"), False),
        (StreamReadError("gave up"), False),
        (chained_as(StreamReadError, ConnectionResetError()), False),  # its retries are spent
        (chained_as(RuntimeError, OfflineModeIsEnabled("HF_HUB_OFFLINE=1")), False),
        (FileNotFoundError(errno.ENOENT, "no such file"), False),
        (PermissionError(errno.EACCES, "denied"), False),
        (OSError("unexpected end of data"), False),
        (ValueError("corrupt row"), False),
        (httpx2.UnsupportedProtocol("ftp"), False),
    ],
)
def test_which_errors_are_transient(error, transient):
    assert is_transient_stream_error(error) is transient
