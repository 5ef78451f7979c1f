"""`tokenmill demo` end to end as a `python -m jobs` process, with tiny budgets: it prints only its
own lines. (Ray's lines with --verbose: tests/system/test_tokenize_processes.py; `tokenmill bench
vae` through the CLI: tests/integration/test_bench_vae.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

# Ray's and MLflow's chatter that quiet mode keeps off the console (it stays in Ray's log files).
CHATTER = ("PlacementGroupCleaner", "TrainingReport", "RayTrainWorker", "TrainController", "SplitCoordinator",
           " INFO ", "Downloading artifacts", "worker processes have been started", "Started a local Ray instance")


def run_demo_cli(root: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TOKENMILL_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", *flags, "demo", "--steps", "20", "--prior-steps", "10", "--workers", "1",
         "--root", str(root),
         "--json", str(root / "summary.json")],
        cwd=REPO, env=env, capture_output=True, timeout=900,
    )
    # Decoded here, not with text=True: universal newlines would turn every \r redraw of a bar into a line.
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def console_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """What a terminal shows: stdout and stderr lines; a progress bar redrawn with \\r is one line."""
    return [line for line in (proc.stdout + proc.stderr).split("\n") if line.strip()]


@pytest.fixture(scope="module")
def quiet_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("demo")
    return root, run_demo_cli(root)


def test_demo_runs_end_to_end_and_prints_only_its_own_lines(quiet_demo):
    root, proc = quiet_demo
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
    lines = console_lines(proc)
    assert [line for line in lines if any(noise in line for noise in CHATTER)] == []
    assert len(lines) <= 40, "\n".join(lines)
    text = "\n".join(lines)
    for ours in ("[1/6] shards", "[2/6] training", "[3/6] tokenizing", "[4/6] decoded", "[5/6] training a Transformer",
                 "[6/6] sampled", "tokenmill demo done", "train: 100%", "tokenize: 100%", "train-prior: 100%"):
        assert ours in text, text
