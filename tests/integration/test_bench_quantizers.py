"""Smoke runs of `tokenmill bench quantizers`: every family pairs with its peer on RGB patches, and
the VQ family on grey MNIST-sized images (the comparison `bench vq` used to run); the JSON summary
carries the reported fields (numbers are the benchmark's job)."""

from __future__ import annotations

import argparse
import json

import torch

from tokenmill.benchmarks import quantizers


def test_bench_quantizers_smoke(monkeypatch):
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(16, 3, 32, 32, generator=g)
    # Random images: the smoke test checks the run and its JSON, not the photo loading.
    monkeypatch.setattr(quantizers, "photo_patches", lambda split, n, seed=0: rgb[:n])
    threads = torch.get_num_threads()
    args = argparse.Namespace(steps=2, warmup=1, batch_size=4, lr=1e-3, seed=0, threads=1, train_patches=16,
                              val_images=8, families=list(quantizers.FAMILIES), datasets=["photos"])
    result = json.loads(json.dumps(quantizers.run(args)))
    assert torch.get_num_threads() == threads  # restored for the rest of the test session
    assert set(result["results"]) == {"photos"} and result["threads"] == 1
    for families in result["results"].values():
        assert set(families) == set(quantizers.FAMILIES)
        for row in families.values():
            for name in ("ours", "peer"):
                assert {"step_ms", "val_usage", "val_psnr", "val_ssim"} <= set(row[name])
                assert 0 < row[name]["val_usage"] <= 1 and -1 <= row[name]["val_ssim"] <= 1
            assert row["step_time_ratio"] > 0 and len(row["targets"]) == 3
    assert result["results"]["photos"]["rvq"]["codebook_size"] == 256


def test_bench_quantizers_vq_on_grey_digits(monkeypatch):
    # Random digits-sized images: the smoke test checks the run and its JSON, not MNIST loading.
    images = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(quantizers, "mnist_tensors", lambda split: (images, torch.zeros(64, dtype=torch.int64)))
    args = argparse.Namespace(steps=3, warmup=1, batch_size=8, lr=1e-3, seed=0, threads=1, train_patches=16,
                              val_images=20, families=["vq"], datasets=["mnist"])
    result = json.loads(json.dumps(quantizers.run(args)))
    row = result["results"]["mnist"]["vq"]
    assert result["mnist_images"] == {"train": 64, "val": 20} and row["codebook_size"] == 512
    for name in ("ours", "peer"):
        assert {"step_ms", "val_usage", "val_psnr", "val_ssim"} <= set(row[name])
    assert row["step_time_ratio"] > 0
