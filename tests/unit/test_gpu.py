"""GPU tests (marked `gpu`, skipped without CUDA): `pytest -m gpu` on a GPU node. The GPU check
(`scripts/gpu_check.sh`, `benchmarks/gpu_check.py`) measures the same things at 256 px with
thresholds; both count syncs with `benchmarks.gpu_phases.count_syncs`.

Host-device synchronisations are counted with CUDA's sync debug mode: a VQ training step with dead
codes (restarted on the device) and the skip rule (decided on the device) makes none; a logging
step adds the one read of the logged values (tests/unit/test_host_syncs.py counts the same on the
CPU, with the line of each read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmill.benchmarks.gpu_phases import count_syncs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def vq_step(precision: str, codebook_size: int = 64, **optim):
    """A CUDA VQ-VAE and the engine's StepRunner over it."""
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.vqvae import VQVAE, VQVAEConfig
    from tokenmill.pipeline.training.optim import OptimConfig, Part
    from tokenmill.pipeline.training.step import StepRunner

    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(in_channels=3, image_size=32, hidden=32, res_blocks=1, downsample=4, latent_dim=16,
                              quantizer=QuantizerConfig(codebook_size=codebook_size))).cuda()
    return StepRunner({"model": Part("model", model, model, OptimConfig(**optim))}, precision, torch.device("cuda"))


def test_vq_training_step_syncs_only_to_read_what_it_logs():
    from tokenmill.pipeline.training.step import own_loss

    # 16 images of 8x8 codes: 1,024 rows for 4,096 codes, so most codes are dead every step.
    step = vq_step("bf16", codebook_size=4096, ema_decay=0.99, skip_grad_norm=1e6)
    x = torch.rand(16, 3, 32, 32, device="cuda")
    step.run(own_loss, [(x,)], 0)  # k-means init: once per run
    results = []
    assert count_syncs(lambda: results.append(step.run(own_loss, [(x,)], 1))) == 0
    quantizer = step.parts["model"].module.quantizer
    assert int((quantizer.cluster_size == quantizer.dead_code_threshold).sum()) > 0  # dead codes were restarted
    # A logging step reads its values once, together (as RankRun.step_metrics does).
    result = results[0]
    logged = [result.losses["model"], result.parts["model"]["grad_norm"], result.metrics["usage"],
              step.parts["model"].skipped_tensor]
    assert count_syncs(lambda: torch.stack([v.float().reshape(()) for v in logged]).tolist()) == 1


def test_tokenize_encoder_on_cuda_bf16_matches_fp32(tmp_path: Path):
    from helpers.tokens import briefly_trained_demo_vqvae

    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder

    path, val = briefly_trained_demo_vqvae(tmp_path / "model")
    files, labels = resolve_model(str(path)), np.zeros(len(val), dtype=np.int64)
    cpu = TokenEncoder(files, latents=False).encode(val, labels)["codes"]
    cuda32 = TokenEncoder(files, latents=False, device="cuda").encode(val, labels)["codes"]
    cuda16 = TokenEncoder(files, latents=False, device="cuda", precision="bf16").encode(val, labels)["codes"]
    assert (cpu == cuda32).mean() >= 0.99  # cuDNN convolutions use TF32 by default: a few near-ties flip
    assert (cuda16 == cuda32).mean() >= 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_on_cuda_learns(precision: str):
    from tokenmill.pipeline.training.step import own_loss

    step = vq_step(precision, lr=3e-3, ema_decay=0)
    x = torch.rand(64, 3, 32, 32, device="cuda")
    first = float(step.run(own_loss, [(x,)], 0).losses["model"])
    for i in range(30):
        last = float(step.run(own_loss, [(x,)], i + 1).losses["model"])
    assert last < first and step.parts["model"].skipped < 10
