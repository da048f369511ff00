"""Which failures to read a stream are worth a retry from the same position.

`is_transient_stream_error` is the rule that `MultiCropStream` retries by: connection resets,
timeouts, network errnos, the transport errors of the HTTP clients under fsspec, datasets and
huggingface_hub, and HTTP answers 408, 429, 500, 502, 503 and 504 (RETRIED_HTTP_STATUSES).
`StreamReadError` is raised when the retries of one block are spent.
"""

import errno

# Stream read failures that `MultiCropStream` retries (see `is_transient_stream_error`).
RETRIED_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH")
    if hasattr(errno, name)
)
# Transport errors of the HTTP clients under fsspec, datasets and huggingface_hub, as (top-level
# module, class name) so that none of those clients has to be installed or imported here.
_CLIENT_TRANSPORT_ERRORS = frozenset(
    [
        (client, name)
        for client in ("httpx", "httpx2")
        for name in ("TimeoutException", "NetworkError", "RemoteProtocolError")
    ]
    + [("requests", "ConnectionError"), ("requests", "Timeout"), ("requests", "ChunkedEncodingError")]
    + [("aiohttp", "ClientConnectionError"), ("aiohttp", "ClientPayloadError")]
    + [("urllib3", "ProtocolError"), ("urllib3", "ReadTimeoutError")]
)
# Subclasses of ConnectionError that no retry can fix.
_PERMANENT_ERRORS = frozenset(
    [("huggingface_hub", "OfflineModeIsEnabled")]
    + [("datasets", "DatasetNotOnHfGcsError"), ("datasets", "MissingFilesOnHfGcsError")]
)


class StreamReadError(RuntimeError):
    """A stream read that still failed after `MultiCropStream`'s retries; the last failure is its `__cause__`."""


def is_transient_stream_error(error: BaseException) -> bool:
    """Whether a failure to read a stream may pass, so that reading again from the same position is worth it.

    Transient, checked on `error` and on each explicit cause (`raise ... from`) behind it:
    - `ConnectionError` (reset, aborted, refused, broken pipe; also what `datasets` raises when its
      own read retries give up) and `TimeoutError` (also `socket.timeout`, `asyncio.TimeoutError`);
    - an `OSError` with a network errno (ENETDOWN, ENETUNREACH, ENETRESET, EHOSTDOWN, EHOSTUNREACH);
    - transport errors of the HTTP clients: httpx `TimeoutException`, `NetworkError`,
      `RemoteProtocolError`; requests `ConnectionError`, `Timeout`, `ChunkedEncodingError`; aiohttp
      `ClientConnectionError`, `ClientPayloadError`; urllib3 `ProtocolError`, `ReadTimeoutError`;
    - an HTTP error (huggingface_hub's `HfHubHTTPError`, requests, httpx, aiohttp) whose status is
      one of RETRIED_HTTP_STATUSES: 408, 429 (rate limit), 500, 502, 503, 504.

    Not transient: everything else, notably missing or forbidden files (`FileNotFoundError`,
    `PermissionError`), other 4xx statuses (a wrong dataset id or token), huggingface_hub's
    `OfflineModeIsEnabled`, and bad data (an unreadable table; an undecodable image never gets
    here: `decode_image` skips it).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        classes = {(c.__module__.split(".")[0], c.__name__) for c in type(error).__mro__}
        if classes & _PERMANENT_ERRORS or isinstance(error, StreamReadError):  # retries already spent
            return False
        if _is_transient(error, classes):
            return True
        error = error.__cause__
    return False


def _is_transient(error: BaseException, classes: set) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)) or classes & _CLIENT_TRANSPORT_ERRORS:
        return True
    if isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS:
        return True
    status = getattr(getattr(error, "response", None), "status_code", None)  # huggingface_hub, requests, httpx
    if status is None and ("aiohttp", "ClientResponseError") in classes:
        status = getattr(error, "status", None)
    return status in RETRIED_HTTP_STATUSES
