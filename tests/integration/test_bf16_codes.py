"""Tokenizing under bf16 autocast gives the fp32 codes, on a briefly trained model (an untrained
model's few codes would say little)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers.threads import one_torch_thread
from helpers.tokens import briefly_trained_demo_vqvae


def test_bf16_codes_agree_with_fp32(tmp_path: Path):
    """The demo's VQ-VAE trained briefly (40 steps of 32 digits, so its codes spread): bf16
    autocast codes against fp32 codes on the 500 val digits (32,000 tokens). Measured 0.996
    here; an untrained model's few codes would say little."""

    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder

    path, val = briefly_trained_demo_vqvae(tmp_path / "model")
    files, labels = resolve_model(str(path)), np.zeros(len(val), dtype=np.int64)
    with one_torch_thread():
        fp32 = TokenEncoder(files, latents=False).encode(val, labels)["codes"]
        bf16 = TokenEncoder(files, latents=False, precision="bf16").encode(val, labels)["codes"]
    agreement = float((fp32 == bf16).mean())
    assert fp32.shape == (500, 8, 8) and len(np.unique(fp32)) > 16  # codes vary: the check means something
    assert agreement >= 0.99, agreement
