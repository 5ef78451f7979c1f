"""Transient vs permanent object-storage errors and the bounded retry (pipeline.runtime.storage_retry).
(The whole path against moto through a fault-injecting s3fs: tests/integration/test_storage_faults_s3.py.)"""

from __future__ import annotations

import errno
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.storage_retry import StorageError, is_storage_error, is_transient, retry_storage


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def translated(outer: OSError, cause: BaseException) -> OSError:
    """What s3fs raises: a Python OSError whose cause is the botocore error."""
    outer.__cause__ = cause
    return outer


TRANSIENT = [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("read timeout"), client_error("SlowDown", 503),
             client_error("InternalError", 500), EndpointConnectionError(endpoint_url="http://s3"),
             translated(OSError(errno.EREMOTEIO, "We encountered an internal error"), client_error("InternalError", 500)),
             translated(OSError("wrapped"), ConnectionResetError("reset"))]
PERMANENT = [PermissionError(errno.EACCES, "Access Denied", "b/k"), FileNotFoundError("b/k"),
             client_error("AccessDenied", 403), client_error("NoSuchBucket", 404),
             translated(PermissionError("Access Denied"), client_error("AccessDenied", 403))]


@pytest.mark.parametrize("err", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_are_retried_then_succeed(err):
    calls, sleeps = [], []

    def step():
        calls.append(1)
        if len(calls) < 3:
            raise err
        return "done"

    assert is_storage_error(err) and is_transient(err)
    assert retry_storage(step, what="writing shard x", url="s3://b/x", sleep=sleeps.append) == "done"
    assert len(calls) == 3 and len(sleeps) == 2 and 0 < sleeps[0] <= sleeps[1] * 2  # backoff grows


@pytest.mark.parametrize("err", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent_errors_stop_at_once_with_one_line(err):
    calls = []

    def step():
        calls.append(1)
        raise err

    assert is_storage_error(err) and not is_transient(err)
    with pytest.raises(StorageError) as caught:
        retry_storage(step, what="input shard 2 (s3://b/shards/train-000002.tar)", url="s3://b/tokens.zarr",
                      sleep=lambda s: None)
    message = str(caught.value)
    assert len(calls) == 1 and isinstance(caught.value, UserError) and "\n" not in message
    assert message.startswith("input shard 2 (s3://b/shards/train-000002.tar): storage error at s3://b/tokens.zarr: ")
    assert type(err).__name__ in message and "rerun" in message


def test_attempts_are_bounded_and_bugs_pass_through():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        raise TimeoutError("read timeout")

    with pytest.raises(StorageError, match=r"kept failing \(5 attempts\): TimeoutError: read timeout"):
        retry_storage(flaky, what="writing the manifest", url="s3://b/manifest.json", sleep=sleeps.append)
    assert len(calls) == 5 and len(sleeps) == 4 and sum(sleeps) < 8

    def bug():
        raise KeyError("not a storage error")

    with pytest.raises(KeyError):
        retry_storage(bug, what="x", url="s3://b", sleep=lambda s: None)
    assert not is_storage_error(ValueError("bad value")) and not is_transient(json.JSONDecodeError("x", "", 0))
