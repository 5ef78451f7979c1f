"""`tokenmill demo` end to end as a process started in a folder of its own (not the repository),
with tiny budgets: it prints only its own lines, and the README's follow-up commands (the blocks
marked `<!-- demo-follow-up -->`) run as written on what it made, from another folder, with no
tracking flag. (Ray's lines with --verbose: tests/system/test_tokenize_processes.py; `tokenmill bench
vae` through the CLI: tests/integration/test_bench_vae.py; the README's walkthrough:
tests/system/test_readme.py.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers.readme import failure, readme_blocks, run_block, user_env

# Ray's and MLflow's chatter that quiet mode keeps off the console (it stays in Ray's log files).
CHATTER = ("PlacementGroupCleaner", "TrainingReport", "RayTrainWorker", "TrainController", "SplitCoordinator",
           " INFO ", "Downloading artifacts", "worker processes have been started", "Started a local Ray instance")


def run_demo_cli(project: Path) -> subprocess.CompletedProcess:
    """`tokenmill demo` as a user starts it in `project`: its outputs go to the default runs/demo."""
    proc = subprocess.run(
        ["tokenmill", "demo", "--steps", "20", "--prior-steps", "10", "--workers", "1",
         "--json", "runs/demo/summary.json"],
        cwd=project, env=user_env(), capture_output=True, timeout=900,
    )
    # Decoded here, not with text=True: universal newlines would turn every \r redraw of a bar into a line.
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """What a terminal shows: stdout and stderr lines; a progress bar redrawn with \\r is one line."""
    return [line for line in (proc.stdout + proc.stderr).split("\n") if line.strip()]


@pytest.fixture(scope="module")
def quiet_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    project = tmp_path_factory.mktemp("project")
    return project, run_demo_cli(project)


def test_demo_runs_end_to_end_and_prints_only_its_own_lines(quiet_demo):
    project, proc = quiet_demo
    root = project / "runs" / "demo"
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary) == {
        "reconstruction_psnr_db", "codebook_usage", "tokenize_img_per_s", "train_img_per_s", "shards", "model_dir",
        "model_uri", "token_store", "decoded_png", "prior_val_bits_per_token", "prior_model_uri", "samples_png",
        "mlflow_tracking_uri", "mlflow_ui", "seconds"}
    for png in ("decoded_png", "samples_png"):
        assert Path(summary[png]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < summary["prior_val_bits_per_token"] < 12  # below log2(4096); a 512-code uniform guess is 9
    assert summary["model_uri"].startswith("models:/") and 0 < summary["codebook_usage"] <= 1
    # One tracking store for the project folder: what `mlflow ui` there shows holds both models.
    assert summary["mlflow_tracking_uri"] == f"sqlite:///{project / 'runs' / 'mlflow.db'}"
    registered = {m.name for m in mlflow.MlflowClient(summary["mlflow_tracking_uri"]).search_registered_models()}
    assert {"tokenmill-vqvae", "tokenmill-prior"} <= registered, registered
    lines = console_lines(proc)
    assert [line for line in lines if any(noise in line for noise in CHATTER)] == []
    assert len(lines) <= 40, "\n".join(lines)
    text = "\n".join(lines)
    for ours in ("[1/6] shards", "[2/6] training", "[3/6] tokenizing", "[4/6] decoded", "[5/6] training a Transformer",
                 "[6/6] sampled", "tokenmill demo done", "train: 100%", "tokenize: 100%", "train-prior: 100%"):
        assert ours in text, text


def test_the_readmes_follow_ups_run_on_the_demos_outputs_from_another_folder(quiet_demo):
    project, demo = quiet_demo
    assert demo.returncode == 0, demo.stderr[-3000:]
    blocks = readme_blocks("demo-follow-up")
    for block in blocks:
        proc = run_block(block, project, user_env())
        assert proc.returncode == 0, failure(block, proc)
    summary = json.loads((project / "runs/demo/summary.json").read_text())
    elsewhere = project / "my-project"  # where the README's block goes: not the demo's folder
    grid = elsewhere / "decoded/grid-00001.png"  # the second grid of 64 rows
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grid.read_bytes() != Path(summary["decoded_png"]).read_bytes()  # rows 64:128, not the demo's 0:64
    labels = np.load(elsewhere / "samples/labels.npy")
    assert labels.tolist() == [7] * 4  # --class 7 --n 4
    lineage = json.loads((elsewhere / "runs/debug-prior/model/lineage.json").read_text())
    tokenizer = hashlib.sha256((Path(summary["model_dir"]) / "model.safetensors").read_bytes()).hexdigest()
    assert lineage["tokenizer_sha256"] == tokenizer and Path(lineage["store_url"]).resolve() == Path(summary["token_store"])
