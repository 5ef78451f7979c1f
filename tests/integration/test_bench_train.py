"""Smoke run of `tokenmill bench train`: a tiny VQ-VAE, a few steps, the 1-worker Ray run, every number
present and positive (the 2-worker DDP path of the same job: tests/integration/test_train_job.py)."""

from __future__ import annotations

import json

from tokenmill.jobs.cli import main as cli_main

TINY = ["model.hidden=16", "model.res_blocks=1", "model.latent_dim=8", "model.quantizer.codebook_size=32",
        "model.quantizer.kmeans_iters=2", "train.batch_size=16", "train.log_every=2"]


def test_bench_train_smoke(ray_local, tmp_path):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "train", "--steps", "4", "--one-worker", *[a for o in TINY for a in ("--set", o)],
                     "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {"ray_1w_img_s", "plain_img_s", "ratio", "ray_2w_img_s", "steps", "batch_size", "threads",
            "cpu_count"} <= set(result)
    assert all(result[key] > 0 for key in ("ray_1w_img_s", "plain_img_s", "ratio")) and result["ray_2w_img_s"] is None
    assert ray_local.is_initialized()  # the session's Ray instance is left running
