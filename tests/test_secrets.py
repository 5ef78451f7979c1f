"""Secrets stay secret: storage credentials in a config reach the job but none of its records
(MLflow params, the model's config.json, the --json summary, the token store's lineage, retrain
tags), and the driver's AWS credentials are not put into the workers' Ray runtime env."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
import zarr

from jobs.cli import main as cli_main
from pipeline.runtime.redaction import MASK, redact
from pipeline.shards.writer import ShardSettings, write_shards

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "KEY-FAKE-4242", "SECRET-FAKE-4242"
ENV_KEY, ENV_SECRET = "ENVKEY-FAKE-4242", "ENVSECRET-FAKE-4242"
FAKES = (KEY, SECRET, ENV_KEY, ENV_SECRET)
TINY = {"train": {"steps": 2, "batch_size": 8, "log_every": 1, "val_every": 2, "checkpoint_every": 2},
        "scaling": {"num_workers": 1}, "run": {"name": "secret-run", "max_failures": 0},
        "tracking": {"registered_model": "secret-run", "log_images": False}}


def test_redact_masks_secret_keys_and_url_passwords_only():
    config = {"data": {"storage_options": {"key": "k", "secret": "s", "token": None, "AWS_Session_Token": "t",
                                           "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}},
              "creds": [{"api_key": "a", "password": "p", "aws_secret_access_key": "x", "credentials": {"a": 1}}],
              "tracking_uri": "https://alice:pw@mlflow.example/x", "token_shape": [[4, 4]],
              "retokenize": {"out_prefix": "s3://b/t"}, "sort_key": "label", "tokenmill_version": "1",
              "problems": [{"shard": "a.tar", "key": "sample-7", "reason": "no image member"}], "token": 5,
              "val_bits_per_token": 2.5}
    out = redact(config)
    options = out["data"]["storage_options"]
    assert options == {"key": MASK, "secret": MASK, "token": None, "AWS_Session_Token": MASK,
                       "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert out["creds"] == [{"api_key": MASK, "password": MASK, "aws_secret_access_key": MASK, "credentials": MASK}]
    assert out["tracking_uri"] == f"https://{MASK}@mlflow.example/x"
    # Common words stay, and outside options `key`/`token` are a sample's key or a model's token.
    for plain in ("token_shape", "retokenize", "sort_key", "tokenmill_version", "problems", "token",
                  "val_bits_per_token"):
        assert out[plain] == config[plain]
    assert config["data"]["storage_options"]["secret"] == "s"  # a copy: the job keeps the real values


def test_store_lineage_is_recorded_redacted(tmp_path):
    from pipeline.tokens.layout import plan_layout
    from pipeline.tokens.store import ArraySpec, TokenStore

    specs = [ArraySpec("codes", (2, 2), "uint16", 50)]
    layout = plan_layout([("a", "train", 5)], 8)
    lineage = {"model_uri": "m", "data": "s3://b/shards", "options": {"secret": SECRET}}
    store = TokenStore(str(tmp_path / "t.zarr"))
    store.prepare(lineage, layout, specs, overwrite=False)
    store.prepare(lineage, layout, specs, overwrite=False)  # the same run again: still matches
    recorded = zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["lineage"]
    assert recorded["options"] == {"secret": MASK} and recorded["model_uri"] == "m"


def test_retrain_tags_are_recorded_redacted(tmp_path):
    from pipeline.registry import promotion

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.create_registered_model("m")
    version = client.create_model_version("m", str(tmp_path), run_id=run_id).version
    promotion.record(client, "m", version, run_id, {"store": f"s3://{KEY}:{SECRET}@bucket/t.zarr"})
    tags = {**client.get_model_version("m", version).tags, **client.get_run(run_id).data.tags}
    assert not _leaks(json.dumps(tags)) and tags[promotion.TAG + "store"] == f"s3://{MASK}@bucket/t.zarr"


@pytest.fixture()
def s3_shards(s3_server, s3_bucket, tmp_path) -> str:
    """48 random 16x16 grey images as shards in the moto bucket (written with the real test creds)."""
    np.save(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 256, (48, 16, 16), dtype=np.uint8))
    write_shards(str(tmp_path / "images.npy"), f"{s3_bucket}/shards", ShardSettings(maxcount=24, val_fraction=0.3),
                 storage_options=s3_server["storage_options"], progress=False)
    return f"{s3_bucket}/shards"


def test_training_records_no_storage_secret_and_forwards_no_aws_credentials(
        ray_local, s3_server, s3_shards, tmp_path, monkeypatch):
    # moto accepts any credentials, so the fake ones really are the ones the job reads S3 with.
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}}
    config = yaml.safe_load((REPO / "configs" / "debug_vqvae.yaml").read_text())
    config["data"].update(shards=s3_shards, storage_options=options, shuffle_buffer=16)
    config = {**config, **TINY, "run": {**TINY["run"], "root": str(tmp_path / "runs")}}
    config["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ENV_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)

    assert cli_main(["train", str(tmp_path / "secret.yaml"), "--json", str(tmp_path / "summary.json")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_metrics"]["step"] == 2  # the job read the bucket with the real values
    params = mlflow.MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"]).data.params
    assert params["data.storage_options.secret"] == MASK and params["data.storage_options.key"] == MASK
    assert params["data.storage_options.client_kwargs.endpoint_url"] == s3_server["endpoint_url"]
    assert not _leaks(json.dumps(params)) and not _leaks(json.dumps(summary))
    assert not _leaks((Path(summary["model_dir"]) / "config.json").read_text())
    leaking = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "secret.yaml" and _leaks(p.read_bytes())]
    assert leaking == []  # nothing the run recorded on disk (MLflow db, checkpoints, model) holds them
    assert not _leaks(json.dumps(_worker_runtime_env(tmp_path / "secret.yaml")))


def _worker_runtime_env(config_path: Path) -> dict:
    """The runtime env `tokenmill train` gives its workers, from the TorchTrainer it builds."""
    from pipeline.training.config import load_train_config
    from pipeline.training.driver import build_torch_trainer
    from pipeline.training.loop import LoopSpec
    from pipeline.training.task import RayInputs
    from pipeline.training.tasks.tokenizer import TokenizerTask

    task = TokenizerTask(load_train_config(config_path))
    trainer = build_torch_trainer(task, LoopSpec("sqlite:///unused.db", "run"), RayInputs())
    env = trainer.run_config.worker_runtime_env["env_vars"]
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    return env


def _leaks(text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    return any(fake.encode() in data for fake in FAKES)
