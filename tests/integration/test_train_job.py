"""The distributed training job end to end: Ray Train DDP with 2 CPU workers over generated
shards, an injected worker failure, a resumed rerun, and a real MLflow server; the train
stream's epoch clock. (Refusals: tests/unit/test_train_job_refusals.py, and of a misspelt config
by a `python -m tokenmill.jobs.train` process: tests/system/test_job_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from helpers import CONFIGS
from helpers.jobs import write_digits_shards

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

DEBUG_CONFIG = str(CONFIGS / "debug_vqvae.yaml")


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> str:
    """The 1,797 scikit-learn digits as uneven PNG shards (300 per shard) with a manifest."""
    return str(write_digits_shards(tmp_path_factory.mktemp("digits-shards"), 300))


def train(tmp_path: Path, shards: str, *overrides: str) -> dict:
    out = tmp_path / f"summary-{len(list(tmp_path.glob('summary-*')))}.json"
    code = cli_main(["train", DEBUG_CONFIG, "--set", f"data.shards={shards}", "--set", f"run.root={tmp_path}",
                     *[arg for o in overrides for arg in ("--set", o)], "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def faulty_run(ray_local, mlflow_server, digits_shards, tmp_path_factory, monkeypatch_module):
    """12 steps, checkpoints every 3; the last rank raises at step 7 once; tracked on the server."""
    from tokenmill.pipeline.runtime import faults

    root = tmp_path_factory.mktemp("faulty-run")
    monkeypatch_module.setenv(faults.ENV, f"train.step,step=7,rank=1,once={root / 'failed-once'}")
    summary = train(root, digits_shards, f"tracking.tracking_uri={mlflow_server}", "run.name=faulty")
    monkeypatch_module.delenv(faults.ENV)
    assert (root / "failed-once").exists()  # the failure really happened
    return root, summary


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_ddp_run_survives_a_worker_failure(faulty_run):
    _, summary = faulty_run
    metrics = summary["final_metrics"]
    assert metrics["step"] == 12
    # Restarted from the step-6 checkpoint, not from zero.
    assert metrics["resumed_from_step"] == 6
    assert Path(summary["checkpoint"]).is_dir()
    assert (Path(summary["checkpoint"]) / "train_state.pt").is_file()
    assert (Path(summary["model_dir"]) / "model.safetensors").is_file()


def test_loss_falls_and_server_has_params_metrics_images_model(faulty_run, mlflow_server, digits_shards):
    from tokenmill.pipeline.shards.manifest import manifest_identity, read_manifest

    _, summary = faulty_run
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["model.kind"] == "vqvae"
    assert run.data.params["train.steps"] == "12"
    assert run.data.tags["tokenmill.data_manifest_identity"] == manifest_identity(read_manifest(digits_shards))
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert {"val/psnr", "val/usage"} <= set(run.data.metrics)
    assert any(key.startswith("system/") for key in run.data.metrics), "system metrics were not logged"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reconstructions", "codebook_usage", "model"} <= artifacts
    version = client.get_model_version(summary["registered_model"], summary["model_version"])
    assert version.run_id == run.info.run_id


def test_rerun_with_same_name_resumes(faulty_run, mlflow_server, digits_shards):
    root, first = faulty_run
    second = train(root, digits_shards, f"tracking.tracking_uri={mlflow_server}", "run.name=faulty", "train.steps=15")
    assert second["final_metrics"]["resumed_from_step"] == 12
    assert second["final_metrics"]["step"] == 15
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert int(second["model_version"]) == int(first["model_version"]) + 1


def test_every_epoch_sets_the_train_streams_epoch_clock(ray_local, tmp_path):
    """Ray Train re-executes one train dataset per epoch; the workers set its epoch clock before
    every pass, so each epoch reads its own shard order, shuffle and random flips
    (tests/integration/test_stream.py checks that a pass follows the clock)."""
    import numpy as np
    import ray

    from tokenmill.pipeline.registry import tracking
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.driver import build_torch_trainer
    from tokenmill.pipeline.training.loop import LoopSpec
    from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

    np.save(tmp_path / "images.npy", np.random.default_rng(0).integers(0, 256, (96, 16, 16), dtype=np.uint8))
    write_shards(str(tmp_path / "images.npy"), str(tmp_path / "shards"), ShardSettings(maxcount=8), progress=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    task = TokenizerTask(load_train_config(DEBUG_CONFIG, [  # ~86 train images: 2 steps of 2x16 per epoch
        f"data.shards={tmp_path / 'shards'}", f"run.root={tmp_path}", "data.transform.hflip=true",
        "train.steps=7", "train.val_every=7", "train.checkpoint_every=7", "tracking.log_images=false",
        f"tracking.tracking_uri={uri}", "run.max_failures=0"]))
    task.prepare(uri)
    inputs = task.inputs(in_process=False)
    run_id = tracking.get_or_create_run(uri, task.config.tracking.experiment, task.config.run.name, tags={},
                                        run_dir=tmp_path)
    metrics = build_torch_trainer(task, LoopSpec(uri, run_id, None, inputs.epoch_clocks), inputs).fit().metrics
    assert metrics["step"] == 7 and metrics["epoch"] == 3
    assert ray.get(inputs.epoch_clocks["train"].get.remote()) == 3


