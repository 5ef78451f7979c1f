"""Every shipped preset in configs/ trains through the real job, as a new user would run it:
`tokenmill train PRESET` (retrain presets: the train part `tokenmill retrain` runs), shrunk with
`--set` to two steps, one validation and image logging on. A preset whose model family lacks
something the job asks of it (an image view, a metric) fails here, not at a user's first
validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from jobs.cli import main as cli_main
from pipeline.shards.writer import ShardSettings, write_shards

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
COVERED_ELSEWHERE = {"debug_retrain_vqvae": "tests/test_retrain.py runs this retrain preset end to end",
                     "debug_prior": "a `tokenmill train-prior` preset: tests/test_train_prior.py runs it",
                     "prior_mnist": "a `tokenmill train-prior` preset: tests/test_train_prior.py loads it, the demo runs it",
                     "debug_vqgan": "tests/test_vqgan.py trains this preset end to end (DDP, GAN on, resume)"}
STEPS = 2
SHRINK = [f"train.steps={STEPS}", f"train.val_every={STEPS}", f"train.checkpoint_every={STEPS}", "train.log_every=1",
          "train.batch_size=8", "train.iw_samples=2", "data.shuffle_buffer=16", "scaling.num_workers=1",
          "run.max_failures=0", "tracking.log_images=true",
          "scaling.use_gpu=false"]  # cluster presets ask for GPUs; this machine may have none
# The image views each model family must show at a validation (see pipeline.training.reporting).
VAE_IMAGES = {"reconstructions", "samples", "interpolations"}
VQ_IMAGES = {"reconstructions", "codebook_usage"}
EXPECTED_IMAGES = {"vae": VAE_IMAGES, "cvae": VAE_IMAGES, "hvae": VAE_IMAGES, "vqvae": VQ_IMAGES, "vqvae2": VQ_IMAGES,
                   "vqgan": VQ_IMAGES}
# The LPIPS weights (VGG16 + lpips heads) are not shipped: presets with a `loss` section train here
# without the perceptual term (tests/test_vqgan.py trains with it, on random weights).
NO_PERCEPTUAL = ["loss.perceptual_weight=0"]


def missing_quantizer_kind(preset: Path) -> str | None:
    """The preset's quantizer kind when this checkout does not have it (lfq before the quantizers merge)."""
    from typing import get_args, get_type_hints

    from models.quantizers import QuantizerConfig

    kind = (yaml.safe_load(preset.read_text()).get("model", {}).get("quantizer") or {}).get("kind")
    return kind if kind and kind not in get_args(get_type_hints(QuantizerConfig)["kind"]) else None


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> str:
    """64 random 32x32 grey images: ~45 train, ~19 val (enough for one batch of image views)."""
    root = tmp_path_factory.mktemp("preset-shards")
    np.save(root / "images.npy", np.random.default_rng(0).integers(0, 256, (64, 32, 32), dtype=np.uint8))
    write_shards(str(root / "images.npy"), str(root / "shards"), ShardSettings(maxcount=32, val_fraction=0.3),
                 progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store for all presets (runs are sequential; creating a store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('preset-mlflow')}/mlflow.db"


def run_preset(preset: Path, shards: str, root: Path, tracking_uri: str) -> dict:
    overrides = [*SHRINK, f"run.root={root}", f"run.name={preset.stem}", f"run.storage_path={root / 'ray'}",
                 f"tracking.tracking_uri={tracking_uri}"]
    if "versions" in yaml.safe_load(preset.read_text()):  # a retrain preset: train its challenger
        from pipeline.registry.config import load_retrain_config
        from pipeline.training.trainer import train

        config = load_retrain_config(preset, overrides)
        return train(config.challenger_config(shards, preset.stem, None, tracking_uri)).to_json()
    out = root / "summary.json"
    if "loss" in yaml.safe_load(preset.read_text()):
        overrides += NO_PERCEPTUAL
    sets = [arg for o in [*overrides, f"data.shards={shards}"] for arg in ("--set", o)]
    assert cli_main(["train", str(preset), *sets, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_validates_and_logs_images(preset, ray_local, tiny_shards, tracking_uri, tmp_path):
    if preset.stem in COVERED_ELSEWHERE:
        pytest.skip(COVERED_ELSEWHERE[preset.stem])
    if missing_quantizer_kind(preset):
        pytest.skip(f"quantizer kind {missing_quantizer_kind(preset)!r} is not in this checkout yet")
    summary = run_preset(preset, tiny_shards, tmp_path, tracking_uri)

    metrics = summary["final_metrics"]
    assert metrics["step"] == STEPS
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    assert val and all(math.isfinite(v) for v in val.values()), val
    assert (Path(summary["model_dir"]) / "model.safetensors").is_file()

    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    run_id = summary["mlflow_run_id"]
    kind = client.get_run(run_id).data.params["model.kind"]
    for folder in EXPECTED_IMAGES[kind]:
        names = [Path(a.path).name for a in client.list_artifacts(run_id, folder)]
        assert any(name.endswith(f"step_{STEPS:07d}.png") for name in names), (folder, names)
