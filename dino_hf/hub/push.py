"""Background uploads of export folders to a Hub model repository.

`HubPusher` uploads in a background thread, so that training never waits for the network: failed
uploads are retried with exponential back-off and reported, never raised, and a newer push replaces
an older one that has not been uploaded yet. The token lives only in memory, inside
`huggingface_hub.HfApi`; it is never logged, written or put in a card.
"""

import dataclasses
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PushFailure:
    """A push that did not reach the Hub: its commit message, the last error (token removed) and how
    many attempts were made."""

    label: str
    error: str
    attempts: int


@dataclasses.dataclass(frozen=True)
class PushReport:
    """What `HubPusher.finish` leaves behind.

    Attributes:
        uploaded: commit messages of the pushes that reached the Hub, in order.
        failed: pushes given up after their retries, or that could not be staged.
        superseded: pushes replaced by a newer one before they were uploaded (the newer folder holds
            everything they held).
        unfinished: pushes still queued or uploading when `finish` stopped waiting.
        final_uploaded: whether the last push reached the Hub.
    """

    uploaded: tuple[str, ...]
    failed: tuple[PushFailure, ...]
    superseded: tuple[str, ...]
    unfinished: tuple[str, ...]
    final_uploaded: bool

    def __str__(self) -> str:
        lines = [
            f"{len(self.uploaded)} uploaded, {len(self.failed)} failed, {len(self.superseded)} superseded, "
            f"{len(self.unfinished)} unfinished; final state {'on' if self.final_uploaded else 'NOT on'} the Hub"
        ]
        lines += [f"  failed: {f.label} after {f.attempts} attempt(s): {f.error}" for f in self.failed]
        lines += [f"  unfinished: {label}" for label in self.unfinished]
        return "\n".join(lines)


@dataclasses.dataclass
class _Job:
    label: str
    staging: Path


class HubPusher:
    """Uploads export folders to a Hub model repository in a background thread.

    `push(folder)` copies the folder to a temporary staging folder (so the local checkpoint is never
    touched and later exports do not race the upload) and returns at once. One upload runs at a time; a
    newer push replaces a queued older one, and also one that is waiting to retry. The repository is
    created on the first upload (`exist_ok`). Connection errors, timeouts, 408, 429 and 5xx answers are
    retried with exponential back-off (`backoff`, doubling up to `max_backoff`, or the server's
    `Retry-After`); other errors (401, 403, 404, bad metadata) fail at once. Failures are logged,
    counted and kept in `.failed`; nothing is raised into the caller. `finish(timeout)` waits for the
    last upload and returns a `PushReport`.

    Args:
        repo_id (`str`): e.g. `"org/dino-vits16"`.
        token (`str`, *optional*): Hub token; defaults to the logged-in one. Kept in memory only.
        private (`bool`, defaults to `False`): create the repository as private.
        endpoint (`str`, *optional*): Hub address; defaults to `HF_ENDPOINT` or https://huggingface.co.
        max_retries (`int`, defaults to 5): retries of one push after its first attempt.
        backoff (`float`, defaults to 2.0): seconds before the first retry.
        max_backoff (`float`, defaults to 120.0): longest wait between two attempts.
    """

    def __init__(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool = False,
        endpoint: str | None = None,
        max_retries: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 120.0,
    ):
        if max_retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                f"max_retries, backoff and max_backoff must be >= 0, got {max_retries}, {backoff}, {max_backoff}"
            )
        self.repo_id = repo_id
        self.private = private
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.retries = 0  # retries made so far, over all pushes
        self._api = HfApi(endpoint=endpoint, token=token)
        self._secret = token or get_token()  # only to scrub error messages
        self._repo_ready = False
        self._uploaded: list[str] = []
        self._failed: list[PushFailure] = []
        self._superseded: list[str] = []
        self._last_label: str | None = None
        self._queued: _Job | None = None
        self._current: _Job | None = None
        self._closing = False
        self._abandoned = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"HubPusher(repo_id={self.repo_id!r}, endpoint={self._api.endpoint!r})"

    @property
    def uploaded(self) -> list[str]:
        with self._cond:
            return list(self._uploaded)

    @property
    def failed(self) -> list[PushFailure]:
        with self._cond:
            return list(self._failed)

    def push(self, folder: str | Path, commit_message: str | None = None) -> None:
        """Queue an upload of the current contents of `folder` and return without waiting."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"nothing to push: {folder} is not a folder; write the export there first")
        label = commit_message or f"Upload {folder.name}"
        with self._cond:
            if self._closing:
                raise RuntimeError("HubPusher.finish() was called; create a new HubPusher to push again")
            self._last_label = label
        staging = Path(tempfile.mkdtemp(prefix="dino_hf-push-"))
        try:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            self._record_failure(label, f"could not copy {folder} for upload: {error}", attempts=0)
            return
        with self._cond:
            if self._queued is not None:
                self._supersede(self._queued)
            self._queued = _Job(label, staging)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dino_hf-hub-push", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def finish(self, timeout: float | None = None) -> PushReport:
        """Wait up to `timeout` seconds (forever if None) for the queued upload, then report. A push
        still running after the timeout is reported as unfinished and dropped at its next retry."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            unfinished = tuple(job.label for job in (self._current, self._queued) if job is not None)
            if unfinished:
                self._abandoned = True
                self._cond.notify_all()
            report = PushReport(
                uploaded=tuple(self._uploaded),
                failed=tuple(self._failed),
                superseded=tuple(self._superseded),
                unfinished=unfinished,
                final_uploaded=self._last_label is not None and self._last_label in self._uploaded,
            )
        log = logger.info if report.final_uploaded or self._last_label is None else logger.warning
        log("Hub uploads to %s: %s", self.repo_id, report)
        return report

    # -- worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued is not None or self._closing)
                if self._queued is None or self._abandoned:
                    if self._queued is not None:
                        shutil.rmtree(self._queued.staging, ignore_errors=True)
                    return
                job, self._queued = self._queued, None
                self._current = job
            try:
                self._upload_with_retries(job)
            finally:
                shutil.rmtree(job.staging, ignore_errors=True)
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _upload_with_retries(self, job: _Job) -> None:
        for attempt in range(1, self.max_retries + 2):
            try:
                uploaded = self._upload(job)
            except Exception as error:  # a failed upload must never reach the training loop
                message = self._redact(" ".join(f"{type(error).__name__}: {error}".split()))
                if not _is_retryable(error) or attempt > self.max_retries:
                    self._record_failure(job.label, message, attempt)
                    return
                delay = min(self.max_backoff, _retry_after(error) or self.backoff * 2 ** (attempt - 1))
                with self._cond:
                    self.retries += 1
                logger.warning(
                    "Upload of %r to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    job.label,
                    self.repo_id,
                    attempt,
                    self.max_retries + 1,
                    message,
                    delay,
                )
                with self._cond:
                    # A newer push (or an abandoned run) ends this one's retries instead of waiting behind them.
                    self._cond.wait_for(lambda: self._queued is not None or self._abandoned, timeout=delay)
                    if self._queued is not None:
                        self._superseded.append(job.label)
                        logger.info("Upload of %r superseded by %r", job.label, self._queued.label)
                        return
                    if self._abandoned:
                        return
            else:
                if uploaded:
                    with self._cond:
                        self._uploaded.append(job.label)
                    logger.info("Uploaded %r to %s", job.label, self.repo_id)
                return

    def _upload(self, job: _Job) -> bool:
        """Create the repository if needed and upload the staged folder; False if abandoned between."""
        if not self._repo_ready:
            self._api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self._repo_ready = True
        if self._abandoned:
            return False
        self._api.upload_folder(repo_id=self.repo_id, folder_path=job.staging, commit_message=job.label)
        return True

    def _supersede(self, job: _Job) -> None:
        """Drop a queued push that a newer one replaces (called with the lock held)."""
        shutil.rmtree(job.staging, ignore_errors=True)
        self._superseded.append(job.label)

    def _record_failure(self, label: str, message: str, attempts: int) -> None:
        message = self._redact(message)
        with self._cond:
            self._failed.append(PushFailure(label, message, attempts))
        logger.error("Upload of %r to %s failed after %d attempt(s): %s", label, self.repo_id, attempts, message)

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _is_retryable(error: Exception) -> bool:
    """Connection problems, timeouts, 408, 429 and 5xx are worth retrying; other answers are final."""
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status in (408, 429) or status >= 500
    return isinstance(error, (httpx2.TransportError, ConnectionError, TimeoutError))


def _retry_after(error: Exception) -> float | None:
    """Seconds of a `Retry-After` header on an HTTP error, if the server sent one."""
    response = getattr(error, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
