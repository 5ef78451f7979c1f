"""Transient vs permanent object-storage errors and the bounded retry (pipeline.runtime.storage_retry);
then the whole path against moto through a fault-injecting s3fs (pipeline.runtime.faults):
shard writing and tokenization survive transient write faults, stop with one line on a
permanent one, and a rerun ends with the same bytes as a run without faults."""

from __future__ import annotations

import errno
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from models.errors import UserError
from pipeline.runtime.storage_retry import StorageError, is_storage_error, is_transient, retry_storage


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


# ------------------------------------------------------------------------------------------------
# End to end: s3fs against moto, writes failing through pipeline.runtime.faults


def s3_objects(fs, root: str) -> dict[str, bytes]:
    """Every object under `root` by relative path, without a store's progress records."""
    paths = sorted(p for p in fs.find(root) if not p[len(root) + 1:].startswith(("markers/", "report/")))
    return {p[len(root) + 1:]: fs.cat_file(p) for p in paths}


@pytest.fixture()
def storage_faults(tmp_path, monkeypatch):
    """`set(**settings)` turns on storage faults here (the driver) and, through the forwarded
    environment, in the Ray workers; returns the log of injected faults."""
    from pipeline.runtime import faults

    folder = tmp_path / "faults"
    folder.mkdir()

    def set_faults(**settings: str):
        monkeypatch.setenv(faults.STORAGE_ENV, ",".join(f"{k}={v}" for k, v in {**settings, "dir": folder}.items()))
        faults.install_from_env()
        return folder / "injected.log"

    yield set_faults
    faults.uninstall()


@pytest.mark.slow
def test_shard_and_tokenize_survive_transient_faults_and_name_a_permanent_one(
        ray_local, s3_server, s3_bucket, storage_faults, tmp_path, capsys):
    import s3fs
    from tokenize_helpers import make_vqvae
    from tokenize_helpers import write_shards as write_reference_shards

    from jobs.cli import main as cli_main
    from pipeline.shards.manifest import manifest_identity, read_manifest
    from pipeline.tokenize.driver import tokenize_dataset
    from pipeline.tokenize.options import TokenizeOptions

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    bucket = s3_bucket[len("s3://"):]
    clean = write_reference_shards(f"{s3_bucket}/clean", tmp_path / "source", n=46)  # shards of 9 + val
    model = str(make_vqvae(tmp_path / "model"))
    tokenize_dataset(model, clean, f"{s3_bucket}/reference.zarr", TokenizeOptions(batch_size=4, actors=1))
    source = tmp_path / "source"
    shard_args = ["shard", str(source / "images.npy"), f"{s3_bucket}/faulty", "--maxcount", "9", "--val-fraction", "0.2",
                  "--labels", str(source / "labels.npy"), "--no-progress"]

    # Shard writing: ~2% of writes and the second train shard fail once; the val shard for good.
    log = storage_faults(rate="0.02", transient="train-000001.tar", permanent="val-000000.tar")
    capsys.readouterr()
    assert cli_main(shard_args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writing shard val-000000.tar" in err[0] and f"{s3_bucket}/faulty/val-000000.tar" in err[0]
    assert "PermissionError" in err[0] and "Access Denied" in err[0] and "Traceback" not in err[0]
    storage_faults(rate="0.02", transient="train-000001.tar")  # the permission is fixed: the rerun finishes
    assert cli_main(shard_args) == 0
    assert manifest_identity(read_manifest(f"{s3_bucket}/faulty")) == manifest_identity(read_manifest(clean))
    assert s3_objects(fs, f"{bucket}/faulty").keys() == s3_objects(fs, f"{bucket}/clean").keys()
    assert {k: v for k, v in s3_objects(fs, f"{bucket}/faulty").items() if k.endswith(".tar")} == \
        {k: v for k, v in s3_objects(fs, f"{bucket}/clean").items() if k.endswith(".tar")}

    # Tokenization: actors hit transient faults (every write of shard 0's marker fails once) and
    # shard 2's marker cannot be written; the other shards finish, the rerun does shard 2 only.
    store = f"{s3_bucket}/tokens.zarr"
    tokenize_args = ["tokenize", "--model", model, "--data", clean, "--out", store, "--batch-size", "4", "--actors", "1"]
    storage_faults(rate="0.02", transient="markers/000000", permanent="markers/000002")
    capsys.readouterr()
    assert cli_main(tokenize_args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "input shard 2 (" in err[0] and "train-000002.tar)" in err[0], err
    assert f"{store}" in err[0] and "PermissionError" in err[0] and "markers/000002" in err[0]
    storage_faults(rate="0.02", transient="markers/000000")
    assert cli_main([*tokenize_args, "--json", str(tmp_path / "summary.json")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_shards"] == summary["input_shards"] - 1  # only shard 2 was encoded again
    assert s3_objects(fs, f"{bucket}/tokens.zarr") == s3_objects(fs, f"{bucket}/reference.zarr")
    injected = log.read_text().splitlines()
    assert any(line.startswith("transient") and "train-000001.tar" in line for line in injected)
    assert any(line.startswith("transient") and "markers/000000" in line for line in injected)  # in an actor
    assert any(line.startswith("permanent") and "markers/000002" in line for line in injected)
