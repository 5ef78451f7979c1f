"""The engine's driver end to end in this process (`scaling.in_process`: the loop runs on one rank
here, no Ray): `tokenmill train` checks, tracks in MLflow, trains, exports, registers and resumes a
rerun, as on Ray (tests/integration/test_train_job.py runs the same driver on Ray). `train-prior
--set scaling.in_process=true` on a store, with the prior's lineage naming the store's tokenizer:
the README walkthrough, tests/system/test_readme.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlflow
from helpers import CONFIGS
from helpers.engine import grey_shards

from tokenmill.jobs.cli import main as cli_main

IN_PROCESS = ["scaling.in_process=true", "train.val_every=2", "train.checkpoint_every=2", "train.batch_size=8"]


def run(command: str, config: Path, root: Path, *overrides: str) -> dict:
    out = root / f"summary-{len(list(root.glob('summary-*')))}.json"
    sets = [a for o in [*IN_PROCESS, f"run.root={root}", *overrides] for a in ("--set", o)]
    assert cli_main([command, str(config), *sets, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_train_in_process_tracks_exports_registers_and_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # another test's Ray, maybe
    shards = grey_shards(tmp_path)
    first = run("train", CONFIGS / "debug_vqvae.yaml", tmp_path, f"data.shards={shards}", "train.steps=4")
    second = run("train", CONFIGS / "debug_vqvae.yaml", tmp_path, f"data.shards={shards}", "train.steps=6")
    again = run("train", CONFIGS / "debug_vqvae.yaml", tmp_path, f"data.shards={shards}", "train.steps=6")
    assert again["final_metrics"] == second["final_metrics"]  # a finished run's rerun: nothing left to train
    assert first["final_metrics"]["step"] == 4 and first["task"] == "tokenizer"
    assert second["final_metrics"]["step"] == 6 and second["final_metrics"]["resumed_from_step"] == 4
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and second["model_version"] == "2"
    assert again["model_version"] == "3"  # registered again: the same weights, a new version
    assert (Path(second["model_dir"]) / "model.safetensors").is_file()
    assert Path(second["checkpoint"]).name == "checkpoint_step_0000006"
    assert second["skipped_samples"]["train"]["skipped"] == 0  # the summary's skip report, as on Ray
    client = mlflow.MlflowClient(second["mlflow_tracking_uri"])
    run_ = client.get_run(second["mlflow_run_id"])
    assert run_.data.params["scaling.in_process"] == "True" and run_.data.tags["tokenmill.task"] == "tokenizer"
    assert {"train/loss", "val/psnr"} <= set(run_.data.metrics)
    assert client.get_model_version(second["registered_model"], "2").run_id == run_.info.run_id
    assert ray_was_up or "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # Ray not started
    # Rank 0's MLflow logging set the tracking URI, which MLflow exports as MLFLOW_TRACKING_URI: a
    # later command in this process must not log to the run's store.
    assert "MLFLOW_TRACKING_URI" not in os.environ

