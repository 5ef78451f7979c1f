"""The VQGAN tokenizer and its loss pieces in this process, and the training job's refusal of
missing LPIPS weights before training. (The two-optimizer job on Ray with 2 DDP workers and
`tokenmill eval` on its model: tests/integration/test_vqgan_ddp.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CONFIGS

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models.serialization import load_model, save_model
from tokenmill.models.vqgan import VQGAN, VQGANConfig
from tokenmill.models.vqgan_loss import adaptive_weight, discriminator_loss, generator_adversarial_loss

DEBUG_CONFIG = str(CONFIGS / "debug_vqgan.yaml")
TINY_VQ = {"kind": "vq", "codebook_size": 16, "kmeans_init": False}


def tiny_vqgan(size: int, mult: tuple[int, ...], quantizer: dict = TINY_VQ) -> VQGAN:
    return VQGAN(VQGANConfig(image_size=size, base_channels=8, channel_mult=mult, res_blocks=1, latent_dim=4,
                             quantizer=quantizer))


@torch.no_grad()
def test_encoder_decoder_shapes_at_each_downsampling():
    torch.manual_seed(0)
    for mult, factor in (((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 2), 16)):
        for size in (32, 64):
            model = tiny_vqgan(size, mult)
            side = size // factor
            latents = model.encoder(torch.rand(1, 3, size, size))  # (1, latent_dim, h, w)
            assert latents.shape == (1, 4, side, side) and model.token_shape == (side, side)
            assert model.decoder(latents).shape == (1, 3, size, size)


def test_tokenizer_interface_and_gradients():
    torch.manual_seed(0)
    model = tiny_vqgan(32, (1, 2, 2))
    x = torch.rand(2, 3, 32, 32)
    output = model(x)
    assert output.recon.shape == x.shape and output.prediction.shape == x.shape and output.indices.shape == (2, 8, 8)
    output.loss.backward()
    assert model.last_layer.grad is not None and torch.isfinite(model.last_layer.grad).all()
    model.eval()
    codes = model.encode(x)
    assert codes.dtype == torch.int64 and int(codes.max()) < model.codebook_size
    assert torch.equal(model.decode(codes), model(x).recon)  # tokenize -> decode is the forward's recon


def test_other_quantizers_plug_in_and_save_load_round_trips(tmp_path):
    for quantizer, shape in (({"kind": "fsq", "levels": [5, 4, 4, 3]}, (4, 4)),
                             ({**TINY_VQ, "kind": "rvq", "num_stages": 2}, (4, 4, 2))):
        model = tiny_vqgan(16, (1, 2, 2), quantizer).eval()
        assert model.token_shape == shape
        x = torch.rand(2, 3, 16, 16)
        loaded = load_model(save_model(model, tmp_path / quantizer["kind"]))
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))


def test_adaptive_weight_comes_from_the_decoders_last_layer():
    torch.manual_seed(0)
    model = tiny_vqgan(16, (1, 2, 2))
    x = torch.rand(4, 3, 16, 16)
    output = model(x)
    fake_logits = (output.prediction * 2 - 1).mean((1, 2, 3)) * 3.0  # a stand-in discriminator, (B,)
    g_loss = generator_adversarial_loss(fake_logits, "hinge")
    nll_grad = torch.autograd.grad(output.loss, model.last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, model.last_layer, retain_graph=True)[0]
    weight = adaptive_weight(nll_grad, g_grad)
    assert weight.ndim == 0 and torch.isfinite(weight) and weight > 0 and not weight.requires_grad
    assert torch.allclose(weight, nll_grad.norm() / (g_grad.norm() + 1e-4))
    # Hinge: zero once real logits pass +1 and fake logits pass -1.
    assert float(discriminator_loss(torch.full((2,), 2.0), torch.full((2,), -2.0), "hinge")) == 0.0
    assert float(discriminator_loss(torch.zeros(2), torch.zeros(2), "non-saturating")) == pytest.approx(np.log(2))


def test_ssim_equals_torchmetrics():
    torchmetrics_ssim = pytest.importorskip("torchmetrics.functional.image").structural_similarity_index_measure
    from tokenmill.models.image_metrics import ssim

    x = torch.rand(3, 3, 24, 24, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim(x, y), torchmetrics_ssim(y, x, data_range=1.0, reduction="none"), atol=1e-12)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_missing_lpips_weights_stop_the_job_before_training(tmp_path, capsys):
    # A unit test: the conftest guard fails it if it starts Ray, so "before training" is checked.
    code = cli_main(["train", DEBUG_CONFIG, "--set", "loss.perceptual_weight=1.0",
                     "--set", f"loss.perceptual.vgg_path={tmp_path / 'nowhere' / 'vgg16-397923af.pth'}",
                     "--set", f"run.root={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "put vgg16-397923af.pth at" in err[0] and "nowhere" in err[0], err
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray").exists()


