"""`python -m tokenmill.jobs.train` and `python -m tokenmill.jobs.retrain` processes given a misspelt config: exit 2
with `<section>.<typo>: unknown key`, no traceback, before Ray or any work. (The jobs themselves:
tests/integration/test_train_job.py, tests/integration/test_retrain.py.)"""

from __future__ import annotations

from helpers import CONFIGS
from helpers.jobs import run_misspelt_config

TRAIN_CONFIG = str(CONFIGS / "debug_vqvae.yaml")
RETRAIN_CONFIG = str(CONFIGS / "debug_retrain_vqvae.yaml")


def test_bad_config_exits_2_before_ray(tmp_path):
    proc = run_misspelt_config("tokenmill.jobs.train", TRAIN_CONFIG, "latent_dim", "latnt_dim", tmp_path)
    assert "model.latnt_dim: unknown key" in proc.stderr and proc.args[-1] in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_bad_config_exits_2_before_any_work(tmp_path):
    proc = run_misspelt_config("tokenmill.jobs.retrain", RETRAIN_CONFIG, "margin", "margn", tmp_path)
    assert "promotion.margn: unknown key" in proc.stderr

