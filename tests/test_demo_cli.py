"""`tokenmill demo` and `tokenmill bench vae` end to end through the CLI, with tiny budgets."""

from __future__ import annotations

import json
import math

from jobs.cli import main
from models import load_model
from models.vae import GaussianVAE


def test_demo_trains_evaluates_and_saves(tmp_path):
    out = tmp_path / "demo"
    report = tmp_path / "demo.json"
    assert main(["demo", "--steps", "20", "--k", "2", "--out", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    expected = {"steps", "train_loss", "test_elbo_nats", "test_nll_nats", "test_bits_per_dim", "k",
                "model_dir", "reconstructions_png", "interpolations_png"}
    assert expected <= set(result)
    assert result["steps"] == 20 and math.isfinite(result["train_loss"])
    assert 0 < result["test_nll_nats"] <= result["test_elbo_nats"]
    assert isinstance(load_model(result["model_dir"]), GaussianVAE)
    assert (out / "reconstructions.png").stat().st_size > 0 and (out / "interpolations.png").stat().st_size > 0


def test_bench_vae_writes_both_models(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "vae", "--budget-s", "2", "--k", "4", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["budget_s"] == 2 and result["k"] == 4
    for name in ("vae", "hvae"):
        assert {"nll_nats", "elbo_nats"} <= set(result[name])
        assert math.isfinite(result[name]["nll_nats"]) and result[name]["nll_nats"] <= result[name]["elbo_nats"]
    assert "hvae" in capsys.readouterr().out
