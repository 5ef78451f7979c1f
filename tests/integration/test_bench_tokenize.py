"""Smoke run of `tokenmill bench tokenize` on a few hundred images: every key the issue names is
there and positive, both compute-limit measurements ran around every run."""

from __future__ import annotations

import json

from tokenmill.jobs.cli import main as cli_main


def test_bench_tokenize_smoke(ray_local, tmp_path):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "tokenize", "--images", "300", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    keys = ("pipeline_img_s", "limit_img_s", "efficiency", "naive_img_s", "vs_naive", "scale_ratio", "read_ratio",
            "read_ratio_chunk_cache", "memory_ratio", "ray_data_services_s")
    assert all(result[key] > 0 for key in keys), {key: result[key] for key in keys}
    # Before and after the naive loop, once Ray is up, then after each of the two pipeline runs.
    assert len(result["limit_one_process_img_s"]) == len(result["limit_side_by_side_img_s"]) == 5
    assert result["limit_samples_img_s"] == [max(a, b) for a, b in zip(result["limit_one_process_img_s"],
                                                                       result["limit_side_by_side_img_s"])]
    assert result["runs"]["large"]["seconds"] > 0 and result["images"] == 300
