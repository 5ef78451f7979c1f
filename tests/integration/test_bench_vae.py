"""`tokenmill bench vae` through the CLI in this process, with a tiny budget."""

from __future__ import annotations

import json
import math

from tokenmill.jobs.cli import main


def test_bench_vae_writes_both_models(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", "vae", "--budget-s", "0.5", "--k", "2", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["budget_s"] == 0.5 and result["k"] == 2
    for name in ("vae", "hvae"):
        assert {"nll_nats", "elbo_nats"} <= set(result[name])
        assert math.isfinite(result[name]["nll_nats"]) and result[name]["nll_nats"] <= result[name]["elbo_nats"]
    assert "hvae" in capsys.readouterr().out

