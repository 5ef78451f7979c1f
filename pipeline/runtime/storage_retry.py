"""Object-storage errors: retry the transient ones with bounded backoff, report the permanent
ones in one line.

s3fs already retries every S3 call (`S3FileSystem.retries`, 5) on timeouts, connection errors
and throttling ("SlowDown"), and botocore retries 5xx and throttling inside each of those. What
still escapes (a longer outage, a connection reset in the middle of a streamed read or upload,
another fsspec backend) reaches `retry_storage`, which reruns a whole idempotent step: one
input shard's rows and marker, one WebDataset shard, a manifest, the token store's metadata.
A permanent error (access denied, no such bucket, quota) or a transient one that outlasts the
attempts becomes a `StorageError`: a UserError (exit 2) naming the step, the URL and the cause.
Any other exception is a bug and passes through untouched.
"""

from __future__ import annotations

import errno
import random
import time
from typing import Callable, Iterator, TypeVar

from tokenmill.models.errors import UserError

T = TypeVar("T")
ATTEMPTS = 5
BASE_DELAY_S = 0.25  # doubled per attempt, with jitter: 0.25, 0.5, 1, 2 s (under 4 s in all)
MAX_DELAY_S = 8.0

# S3 error codes (and HTTP statuses) that mean "try again later".
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "500", "502", "503", "504",
}
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN,
                    getattr(errno, "EREMOTEIO", errno.EIO)}  # s3fs: InternalError -> EREMOTEIO
# Exception class names of the HTTP stacks under fsspec (botocore, aiohttp, fsspec itself) that are
# transient; by name so that this module imports none of them.
TRANSIENT_TYPES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "HTTPClientError", "ClientConnectionError",
    "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError", "FSTimeoutError", "IncompleteRead",
}
PERMANENT_TYPES = {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError"}


class StorageError(UserError):
    """A storage step failed for good; the message names the step, the URL and the cause."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _code(err: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (or its HTTP status), else None."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None
    return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def is_transient(err: BaseException) -> bool:
    """A timeout, a dropped connection or throttling anywhere in the exception's chain."""
    for e in _chain(err):
        if isinstance(e, (PermissionError, FileNotFoundError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)) or type(e).__name__ in TRANSIENT_TYPES:
            return True
        if _code(e) in TRANSIENT_CODES or (isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS):
            return True
    return False


def is_storage_error(err: BaseException) -> bool:
    """An error of the storage rather than of our code: OSError (s3fs translates S3 errors to
    PermissionError, FileNotFoundError, OSError) or an error of the HTTP client below fsspec."""
    return any(isinstance(e, OSError) or _code(e) is not None or type(e).__name__ in TRANSIENT_TYPES | PERMANENT_TYPES
               for e in _chain(err))


def describe(err: BaseException) -> str:
    """`Type: message` on one line (with the object's path when the error names one)."""
    text = " ".join(str(err).split()) or "no message"
    filename = getattr(err, "filename", None)
    if filename and str(filename) not in text:
        text += f" ({filename})"
    return f"{type(err).__name__}: {text}"


def retry_storage(step: Callable[[], T], *, what: str, url: str, attempts: int = ATTEMPTS,
                  sleep: Callable[[float], None] = time.sleep) -> T:
    """`step()`, called again after a transient storage error (up to `attempts` calls in all,
    exponential backoff with jitter); StorageError for a permanent storage error or when the
    attempts are used up. `step` must be idempotent. `what` and `url` name it in the message."""
    for attempt in range(1, attempts + 1):
        try:
            return step()
        except Exception as err:  # noqa: BLE001 - sorted below; anything else is re-raised
            if not is_storage_error(err):
                raise
            if not is_transient(err):
                raise StorageError(f"{what}: storage error at {url}: {describe(err)}; fix the storage "
                                   "(permissions, bucket, credentials, quota) and rerun: finished work is kept") from err
            if attempt == attempts:
                raise StorageError(f"{what}: storage at {url} kept failing ({attempts} attempts): {describe(err)}; "
                                   "rerun when it is reachable again: finished work is kept") from err
            delay = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempt - 1))
            sleep(delay * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")
