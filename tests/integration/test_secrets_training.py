"""Secrets stay secret in a training job on Ray: storage credentials in a config reach the job
(it reads the moto bucket with them) but none of its records (MLflow params, the model's
config.json, the --json summary, anything on disk), and the driver's AWS credentials are not put
into the workers' Ray runtime env. (Redaction itself: tests/unit/test_secrets.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from helpers import CONFIGS
from helpers.credentials import ENV_KEY, ENV_SECRET, KEY, SECRET, leaks

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.runtime.redaction import MASK
from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

TINY = {"train": {"steps": 2, "batch_size": 8, "log_every": 1, "val_every": 2, "checkpoint_every": 2},
        "scaling": {"num_workers": 1}, "run": {"name": "secret-run", "max_failures": 0},
        "tracking": {"registered_model": "secret-run", "log_images": False}}


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
    config = yaml.safe_load((CONFIGS / "debug_vqvae.yaml").read_text())
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
    assert not leaks(json.dumps(params)) and not leaks(json.dumps(summary))
    assert not leaks((Path(summary["model_dir"]) / "config.json").read_text())
    leaking = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "secret.yaml" and leaks(p.read_bytes())]
    assert leaking == []  # nothing the run recorded on disk (MLflow db, checkpoints, model) holds them
    assert not leaks(json.dumps(_worker_runtime_env(tmp_path / "secret.yaml")))


def _worker_runtime_env(config_path: Path) -> dict:
    """The runtime env `tokenmill train` gives its workers, from the TorchTrainer it builds."""
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.driver import build_torch_trainer
    from tokenmill.pipeline.training.loop import LoopSpec
    from tokenmill.pipeline.training.task import Inputs
    from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

    task = TokenizerTask(load_train_config(config_path))
    trainer = build_torch_trainer(task, LoopSpec("sqlite:///unused.db", "run"), Inputs())
    env = trainer.run_config.worker_runtime_env["env_vars"]
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    return env
