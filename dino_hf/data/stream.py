"""`MultiCropStream`: decoded, augmented samples of an image stream, resumable from a checkpoint.

Rows are read in blocks and each block is shuffled with seeded randomness, so that the stream position
(part of the training state) resumes exactly; rows whose image does not decode are skipped and
counted; a read of the stream that fails for a passing reason (`is_transient_stream_error`) is retried
from the last block's position with back-off.
"""

import logging
import time
from collections import Counter
from itertools import islice

import numpy as np
import torch
from datasets import IterableDataset
from PIL import Image

from .decoding import DEFAULT_MAX_PIXELS, decode_image
from .stream_errors import StreamReadError, is_transient_stream_error

logger = logging.getLogger(__name__)


def _describe_stream(stream: IterableDataset) -> str:
    """A short name of a stream's source for messages: dataset or builder name, config, split, shards."""
    info = getattr(stream, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or type(stream).__name__
    config = getattr(info, "config_name", None)
    parts = [f"config {config}"] if config and config != "default" else []
    if getattr(stream, "split", None):
        parts.append(f"split {stream.split}")
    if getattr(stream, "num_shards", None):
        parts.append(f"{stream.num_shards} shards")
    return f"{name!r} ({', '.join(parts)})" if parts else repr(name)


class MultiCropStream(torch.utils.data.IterableDataset):
    """Decoded, augmented samples of a stream, in an order that a checkpoint can resume exactly.

    Rows are read in blocks of `shuffle_buffer_size` and each block is yielded in a random order
    (seeded by seed, epoch, worker and block). The state (`state_dict`) is the stream's own state
    at the start of the current block plus the position in it, so a resumed iteration re-reads at
    most one block of undecoded rows and then yields exactly the samples an uninterrupted one
    would have; each sample's augmentation is seeded by the same numbers, so it is reproduced too.
    A buffer of datasets' `shuffle` would instead lose its content on resume.

    A read of the stream that fails with a transient error (`is_transient_stream_error`: a
    connection reset, a timeout, HTTP 429 / 5xx) is retried the same way: the stream is re-opened
    at the state of the start of the block being read and the block is read again, so the samples
    are those of an uninterrupted run. Before retry k (1, 2, ...) it waits
    `min(retry_delay * 2 ** (k - 1), max_retry_delay)` seconds and logs a warning; after
    `max_retries` failed retries of one block in a row it raises `StreamReadError` from the last
    failure. Other errors propagate at once. (`datasets` already retries single reads of remote
    files; these retries also cover opening a shard and failures after its own retries gave up.)

    Each sample is `{"crops": [2 + N tensors], "id": str, "skipped": Counter, "stream_retries": int}`,
    where `skipped` counts the rows skipped and `stream_retries` the retried stream reads since the
    previous sample of this worker (the last sample also carries the trailing ones), so that counts
    from every worker reach the main process with the batches. Use a different `seed` in each process.
    """

    def __init__(
        self,
        stream: IterableDataset,
        image_column: str,
        transform,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        id_column: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = 1,
        max_retries: int = 5,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
    ):
        if max_retries < 0 or retry_delay < 0 or max_retry_delay < 0:
            raise ValueError(
                f"max_retries, retry_delay and max_retry_delay must be >= 0, got {max_retries}, {retry_delay}, "
                f"{max_retry_delay}; max_retries=0 turns the retries off"
            )
        self.stream = stream
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.block_size = max(1, shuffle_buffer_size)
        self.id_column = id_column
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.epoch = 0
        self._resume_from = None
        self._state = self._cursor_state(None, 0, 0)

    def set_epoch(self, epoch: int) -> None:
        """A new epoch re-shuffles the stream's shards and the blocks."""
        self.epoch = epoch

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self._resume_from = dict(state_dict)
        self._state = dict(state_dict)

    def _cursor_state(self, anchor, block: int, position: int, exhausted: bool = False) -> dict:
        return {"epoch": self.epoch, "anchor": anchor, "block": block, "position": position, "exhausted": exhausted}

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        previous = None
        for cursor, row, image, counts in self._decoded_rows(worker_id):
            if previous is not None:
                if image is None:  # trailing skips and retries: report them with the last sample
                    previous[3][0].update(counts[0])
                    previous[3][1] += counts[1]
                    break
                self._state = self._cursor_state(*cursor)
                yield self._sample(worker_id, *previous)
            previous = (cursor, row, image, counts)
        if previous is not None and previous[2] is not None:
            self._state = self._cursor_state(*previous[0][:2], previous[0][2] + 1, exhausted=True)
            yield self._sample(worker_id, *previous)

    def _decoded_rows(self, worker_id: int):
        """Yields `((anchor, block, position), row, image, [skipped, retries])` per decodable row,
        then `(None, None, None, [skipped, retries])` if rows were skipped or reads retried after
        the last one."""
        resume, self._resume_from = self._resume_from, None
        if resume is not None and resume["epoch"] == self.epoch:
            if resume["exhausted"]:
                return
            anchor, block, start = resume["anchor"], resume["block"], resume["position"]
        else:
            anchor, block, start = None, 0, 0
        self.stream.set_epoch(self.epoch)
        rows = None  # opened by _read_block at `anchor`; None starts the epoch from its beginning
        counts = [Counter(), 0]
        while True:
            rows, buffer, retries = self._read_block(rows, anchor, block)
            counts[1] += retries
            if not buffer:
                break
            order = np.random.default_rng([self.seed, self.epoch, worker_id, block]).permutation(len(buffer))
            for position in range(start, len(buffer)):
                row = buffer[order[position]]
                image = decode_image(row[self.image_column], counts[0], self.max_pixels, self.min_side)
                if image is not None:
                    yield (anchor, block, position), row, image, counts
                    counts = [Counter(), 0]
            anchor, block, start = self.stream.state_dict(), block + 1, 0
        if counts[0] or counts[1]:
            yield None, None, None, counts

    def _read_block(self, rows, anchor, block: int) -> tuple:
        """Reads the next `block_size` rows from the iterator `rows` (None: open the stream at
        `anchor`), re-opening at `anchor` after a transient failure. Returns `(rows, block's rows,
        number of retries)`."""
        failures = 0
        while True:
            try:
                if rows is None:
                    self.stream.load_state_dict(anchor)
                    rows = iter(self.stream)
                return rows, list(islice(rows, self.block_size)), failures
            except Exception as error:
                if not is_transient_stream_error(error):
                    raise
                failures += 1
                where = f"epoch {self.epoch}, block {block} of {self.block_size} rows"
                if failures > self.max_retries:
                    raise StreamReadError(
                        f"reading the stream {_describe_stream(self.stream)} failed after {failures} "
                        f"attempt{'s' if failures > 1 else ''} in a row ({self.max_retries} retries) at {where}, "
                        "last with "
                        f"{type(error).__name__}: {error}; check the connection to the source, or allow more retries "
                        f"(max_retries, retry_delay)"
                    ) from error
                delay = min(self.retry_delay * 2 ** (failures - 1), self.max_retry_delay)
                logger.warning(
                    f"reading the stream {_describe_stream(self.stream)} failed at {where} with "
                    f"{type(error).__name__}: {error}; retry {failures} of {self.max_retries} in {delay:g} s"
                )
                time.sleep(delay)
                rows = None

    def _sample(self, worker_id: int, cursor: tuple, row: dict, image: Image.Image, counts: list) -> dict:
        _, block, position = cursor
        key = np.random.SeedSequence([self.seed, self.epoch, worker_id, block, position]).generate_state(2)
        generator = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
        sample_id = self._sample_id(row, worker_id, block, position)
        return {
            "crops": self.transform(image, generator),
            "id": sample_id,
            "skipped": counts[0],
            "stream_retries": counts[1],
        }

    def _sample_id(self, row: dict, worker_id: int, block: int, position: int) -> str:
        if self.id_column is not None:
            return str(row[self.id_column])
        value = row[self.image_column]
        if isinstance(value, dict) and value.get("path"):
            return value["path"]
        if "__key__" in row:
            return f"{row.get('__url__', '')}::{row['__key__']}"
        return f"worker{worker_id}/block{block}/{position}"
