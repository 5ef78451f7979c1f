"""The VQGAN's two-optimizer training job end to end on Ray.

The job test trains configs/debug_vqgan.yaml on Ray (2 DDP workers) with the perceptual loss on
(random LPIPS weights in the published file formats) past the discriminator start, checks that
the checkpoint holds the discriminator and its optimizer, and then runs
`tokenmill eval` twice on the exported model. (The model and its loss pieces: tests/unit/test_vqgan.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import CONFIGS
from helpers.engine import rgb_shards as helper_rgb_shards
from helpers.lpips import write_random_lpips_weights

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models.serialization import load_model

DEBUG_CONFIG = str(CONFIGS / "debug_vqgan.yaml")


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> str:
    """48 smooth random 16x16 RGB images (upsampled 4x4 noise): ~34 train, ~14 val."""
    return helper_rgb_shards(tmp_path_factory.mktemp("rgb-shards"))


@pytest.fixture(scope="module")
def trained(ray_local, rgb_shards, tmp_path_factory):
    """6 steps (discriminator from step 2) on 2 DDP workers, with LPIPS on random weights.
    (Resume, precision and the step's gradients are unit tests: tests/unit/test_engine_adversarial.py.)"""
    root = tmp_path_factory.mktemp("vqgan-run")
    vgg, lin = write_random_lpips_weights(root)
    sets = [f"data.shards={rgb_shards}", f"run.root={root}", "scaling.num_workers=2", "loss.perceptual_weight=0.1",
            f"loss.perceptual.vgg_path={vgg}", f"loss.perceptual.lin_path={lin}", "loss.perceptual.verify_sha256=false",
            "tracking.log_images=false", "train.steps=6"]
    out = root / "summary.json"
    assert cli_main(["train", DEBUG_CONFIG, *[a for s in sets for a in ("--set", s)], "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    return summary, torch.load(Path(summary["checkpoint"]) / "train_state.pt", weights_only=True), (vgg, lin)


def test_two_ddp_workers_train_both_parts_and_checkpoint_them(trained):
    summary, state, _ = trained
    metrics = summary["final_metrics"]
    assert metrics["step"] == 6 and np.isfinite(metrics["val/psnr"]) and 0 < metrics["val/ssim"] <= 1
    disc = state["parts"]["discriminator"]
    assert disc["steps"] == 4 and disc["optimizer"]["state"]  # steps 2..5 of 0..5: disc_start=2
    assert float(state["extra"]["task"]["lecam"]["ema_real"]) != 0.0
    assert not any(k.startswith(("disc", "lpips")) for k in load_model(summary["model_dir"]).state_dict())
    tags = mlflow.MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"]).data.tags
    assert len(tags["tokenmill.lpips.vgg_sha256"]) == 64 and tags["tokenmill.task"] == "adversarial"


def test_eval_twice_gives_identical_json_and_a_png(trained, rgb_shards, tmp_path):
    run, _, (vgg, lin) = trained
    outputs = []
    for attempt in range(2):
        out = tmp_path / f"eval-{attempt}.json"
        assert cli_main(["eval", "--model", run["model_dir"], "--data", rgb_shards, "--out", str(tmp_path / "png"),
                         "--lpips-vgg", str(vgg), "--lpips-lin", str(lin), "--batch-size", "5",
                         "--json", str(out)]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    summary = json.loads(outputs[0])
    metrics = summary["metrics"]
    assert metrics["images"] == run["final_metrics"]["val/images"]  # the whole split, each image once
    assert metrics["psnr"] == pytest.approx(run["final_metrics"]["val/psnr"], rel=1e-6)  # the shared metric code
    assert {"ssim", "hf_ratio", "usage", "perplexity", "code_entropy_bits", "lpips"} <= set(metrics)
    assert summary["lpips"]["vgg_sha256"] and summary["lpips"]["published_weights"] == "false"
    assert summary["rfid"].startswith("unavailable: ") or len(summary["rfid"]["sha256"]) == 64
    assert summary["protocol"]["transform"]["resize"] == "resize" and summary["protocol"]["version"]
    png = Path(summary["png"])
    assert png.is_file() and png.stat().st_size > 0

