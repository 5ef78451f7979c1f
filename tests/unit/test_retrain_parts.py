"""The parts of `tokenmill retrain` that need no Ray and no server: the decision rule and data
version discovery. (The workflow end to end and the registry lock: tests/integration/test_retrain.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import CONFIGS
from helpers.jobs import write_digits_shards

from tokenmill.pipeline.registry import promotion
from tokenmill.pipeline.registry.config import load_retrain_config
from tokenmill.pipeline.shards.manifest import read_manifest, write_manifest
from tokenmill.pipeline.shards.versions import newest_version

CONFIG = str(CONFIGS / "debug_retrain_vqvae.yaml")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """builtin:digits as PNG shards of 600 with a manifest (a data version)."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"), 600)


@pytest.mark.parametrize(("kind", "challenger", "champion", "margin", "promote"), [
    ("vqvae", {"val/psnr": 20.0, "val/usage": 0.5}, None, 0.0, True),
    ("vqvae", {"val/psnr": 20.2, "val/usage": 0.5}, {"val/psnr": 20.0}, 0.1, True),
    ("vqvae", {"val/psnr": 20.05, "val/usage": 0.5}, {"val/psnr": 20.0}, 0.1, False),
    ("vqvae", {"val/psnr": 20.0, "val/usage": 0.5}, {"val/psnr": 20.0}, 0.0, False),  # a tie keeps the champion
    ("vqvae", {"val/psnr": 30.0, "val/usage": 0.01}, {"val/psnr": 20.0}, 0.0, False),  # collapsed codebook
    ("vqvae", {"val/psnr": float("nan"), "val/usage": 0.5}, None, 0.0, False),
    ("vae", {"val/nll_nats": 90.0}, {"val/nll_nats": 100.0}, 5.0, True),  # lower NLL is better
    ("vae", {"val/nll_nats": 98.0}, {"val/nll_nats": 100.0}, 5.0, False),
])
def test_decision_rule(kind, challenger, champion, margin, promote):
    from tokenmill.models.vae import VAEConfig

    floor = 0.05 if kind == "vqvae" else 0.0
    config = load_retrain_config(CONFIG, [f"promotion.margin={margin}", f"promotion.usage_floor={floor}"])
    if kind == "vae":
        config = config.model_copy(update={"model": VAEConfig()})
    assert promotion.decide(config, challenger, champion).promote is promote


def test_newest_version_is_the_greatest_complete_folder_name(digits, tmp_path):
    for name in ("2025-01-01", "2025-02-01", "2025-03-01"):
        shutil.copytree(digits, tmp_path / name)
    (tmp_path / "2025-04-01").mkdir()  # no manifest yet
    manifest = read_manifest(str(tmp_path / "2025-03-01"))
    write_manifest(str(tmp_path / "2025-03-01"), {**manifest, "complete": False})  # still being written
    found = newest_version(str(tmp_path))
    assert (found.name, found.url) == ("2025-02-01", str(tmp_path / "2025-02-01"))



def test_a_challenger_starts_from_the_champion_else_from_the_configured_init_from():
    """No champion yet: the first challenger warm-starts from `train.init_from` (e.g. a published checkpoint)."""
    config = load_retrain_config(CONFIG, ["train.init_from=taming:logs/vqgan_imagenet_f16_1024"])
    assert config.challenger_config("v1", "c", None, "").train.init_from == "taming:logs/vqgan_imagenet_f16_1024"
    assert config.challenger_config("v1", "c", "models:/tok/3", "").train.init_from == "models:/tok/3"
