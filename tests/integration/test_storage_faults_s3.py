"""Storage faults end to end: s3fs against moto through a fault-injecting s3fs (pipeline.runtime.faults),
tokenization on local Ray: shard writing and tokenization survive transient write faults, stop
with one line on a permanent one, and a rerun ends with the same bytes as a run without faults.
(The retry rule itself: tests/unit/test_storage_retry.py.)"""

from __future__ import annotations

import json

import pytest


@pytest.fixture()
def storage_faults(tmp_path, monkeypatch):
    """`set(**settings)` turns on storage faults here (the driver) and, through the forwarded
    environment, in the Ray workers; returns the log of injected faults."""
    from tokenmill.pipeline.runtime import faults

    folder = tmp_path / "faults"
    folder.mkdir()

    def set_faults(**settings: str):
        monkeypatch.setenv(faults.STORAGE_ENV, ",".join(f"{k}={v}" for k, v in {**settings, "dir": folder}.items()))
        faults.install_from_env()
        return folder / "injected.log"

    yield set_faults
    faults.uninstall()


def test_shard_and_tokenize_survive_transient_faults_and_name_a_permanent_one(
        ray_local, s3_server, s3_bucket, storage_faults, tmp_path, capsys):
    import s3fs
    from helpers.tokens import make_vqvae, s3_objects
    from helpers.tokens import write_shards as write_reference_shards

    from tokenmill.jobs.cli import main as cli_main
    from tokenmill.pipeline.shards.manifest import manifest_identity, read_manifest
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

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

