"""The VQGAN tokenizer, its loss pieces, and the two-optimizer training job end to end.

The job test trains configs/debug_vqgan.yaml on Ray (2 DDP workers) with the perceptual loss on
(random LPIPS weights in the published file formats) past the discriminator start, checks that
the checkpoint holds the discriminator and its optimizer, and then runs
`tokenmill eval` twice on the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from test_lpips import write_random_lpips_weights

from jobs.cli import main as cli_main
from models.serialization import load_model, save_model
from models.vqgan import VQGAN, VQGANConfig
from models.vqgan_loss import adaptive_weight, discriminator_loss, generator_adversarial_loss
from pipeline.shards.writer import ShardSettings, write_shards

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(REPO / "configs" / "debug_vqgan.yaml")
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
    from models.image_metrics import ssim

    x = torch.rand(3, 3, 24, 24, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ssim(x, y), torchmetrics_ssim(y, x, data_range=1.0, reduction="none"), atol=1e-12)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))


def test_missing_lpips_weights_stop_the_job_before_training(tmp_path, capsys):
    # Not marked slow: the conftest guard fails this test if it starts Ray, so "before training" is checked.
    code = cli_main(["train", DEBUG_CONFIG, "--set", "loss.perceptual_weight=1.0",
                     "--set", f"loss.perceptual.vgg_path={tmp_path / 'nowhere' / 'vgg16-397923af.pth'}",
                     "--set", f"run.root={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "put vgg16-397923af.pth at" in err[0] and "nowhere" in err[0], err
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray").exists()


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory) -> str:
    """48 smooth random 16x16 RGB images (upsampled 4x4 noise): ~34 train, ~14 val."""
    root = tmp_path_factory.mktemp("rgb-shards")
    coarse = np.random.default_rng(0).integers(0, 256, (48, 4, 4, 3)).astype(np.uint8)
    np.save(root / "images.npy", coarse.repeat(4, axis=1).repeat(4, axis=2))
    write_shards(str(root / "images.npy"), str(root / "shards"), ShardSettings(maxcount=24, val_fraction=0.3),
                 progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def trained(ray_local, rgb_shards, tmp_path_factory):
    """6 steps (discriminator from step 2) on 2 DDP workers, with LPIPS on random weights.
    (Resume, precision and the step's gradients are unit tests: tests/unit/test_engine_adversarial.py.)"""
    root = tmp_path_factory.mktemp("vqgan-run")
    vgg, lin = write_random_lpips_weights(root)
    sets = [f"data.shards={rgb_shards}", f"run.root={root}", "scaling.num_workers=2", "loss.perceptual_weight=0.1",
            f"loss.perceptual.vgg_path={vgg}", f"loss.perceptual.lin_path={lin}", "loss.perceptual.verify_sha256=false",
            "tracking.log_images=false", "train.steps=6"]
    out = root / "summary.json"
    assert cli_main(["train", DEBUG_CONFIG, *[a for s in sets for a in ("--set", s)], "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    return summary, torch.load(Path(summary["checkpoint"]) / "train_state.pt", weights_only=True), (vgg, lin)


def test_two_ddp_workers_train_both_parts_and_checkpoint_them(trained):
    summary, state, _ = trained
    metrics = summary["final_metrics"]
    assert metrics["step"] == 6 and np.isfinite(metrics["val/psnr"]) and 0 < metrics["val/ssim"] <= 1
    disc = state["parts"]["discriminator"]
    assert disc["steps"] == 4 and disc["optimizer"]["state"]  # steps 2..5 of 0..5: disc_start=2
    assert float(state["extra"]["task"]["lecam"]["ema_real"]) != 0.0
    assert not any(k.startswith(("disc", "lpips")) for k in load_model(summary["model_dir"]).state_dict())
    tags = mlflow.MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"]).data.tags
    assert len(tags["tokenmill.lpips.vgg_sha256"]) == 64 and tags["tokenmill.task"] == "adversarial"


def test_eval_twice_gives_identical_json_and_a_png(trained, rgb_shards, tmp_path):
    run, _, (vgg, lin) = trained
    outputs = []
    for attempt in range(2):
        out = tmp_path / f"eval-{attempt}.json"
        assert cli_main(["eval", "--model", run["model_dir"], "--data", rgb_shards, "--out", str(tmp_path / "png"),
                         "--lpips-vgg", str(vgg), "--lpips-lin", str(lin), "--batch-size", "5",
                         "--json", str(out)]) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    summary = json.loads(outputs[0])
    metrics = summary["metrics"]
    assert metrics["images"] == run["final_metrics"]["val/images"]  # the whole split, each image once
    assert metrics["psnr"] == pytest.approx(run["final_metrics"]["val/psnr"], rel=1e-6)  # the shared metric code
    assert {"ssim", "hf_ratio", "usage", "perplexity", "code_entropy_bits", "lpips"} <= set(metrics)
    assert summary["lpips"]["vgg_sha256"] and summary["lpips"]["published_weights"] == "false"
    assert summary["rfid"].startswith("unavailable: ") or "inception_sha256" in summary["rfid"]
    assert summary["protocol"]["transform"]["resize"] == "resize" and summary["protocol"]["version"]
    png = Path(summary["png"])
    assert png.is_file() and png.stat().st_size > 0
