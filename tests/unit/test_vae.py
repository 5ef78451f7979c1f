"""GaussianVAE (conv, MLP), ConditionalVAE, the IW bound and latent operations."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tokenmill.models.image_metrics import importance_weighted_nll
from tokenmill.models.latent_ops import apply_attribute, attribute_vector, encode, interpolate, lerp, make_grid, slerp
from tokenmill.models.vae import ConditionalVAE, CVAEConfig, GaussianVAE, VAEConfig
from tokenmill.pipeline.grids import save_png_grid


def images(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(3)).round()


@pytest.mark.parametrize("arch", ["conv", "mlp"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "dlogistic"])
def test_forward_reports_the_elbo_in_nats_per_image(arch, likelihood):
    torch.manual_seed(0)
    model = GaussianVAE(VAEConfig(arch=arch, image_size=16, hidden=16, latent_dim=4, likelihood=likelihood, learn_sigma=True))
    out = model(images(), kl_weight=0.5)
    m = out.metrics
    assert out.recon.shape == (6, 1, 16, 16) and 0.0 <= float(out.recon.detach().min()) and float(out.recon.detach().max()) <= 1.0
    assert torch.allclose(m["elbo"], -(m["distortion"] + m["rate"]))
    assert torch.allclose(out.loss, m["distortion"] + 0.5 * m["rate"], atol=1e-4)
    assert float(m["rate"]) >= 0.0 and torch.isfinite(m["bits_per_dim"])
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_iw_bound_is_above_the_elbo_and_tightens_with_k():
    torch.manual_seed(0)
    model = GaussianVAE(VAEConfig(arch="mlp", image_size=16, hidden=32, latent_dim=8))
    with torch.no_grad():  # make p(x|z) depend strongly on z, as after training, so K matters
        model.decoder.net[0].weight.mul_(10.0)
    x = images(20)
    torch.manual_seed(1)
    k1 = importance_weighted_nll(model, x, k=1)
    torch.manual_seed(1)
    k64 = importance_weighted_nll(model, x, k=64, max_batch=300)  # several K chunks
    assert k1["nll_nats"] == pytest.approx(k1["elbo_nats"], rel=1e-6)  # K = 1 is the ELBO
    assert k64["nll_nats"] <= k64["elbo_nats"]  # −log p(x) bound below −ELBO
    assert k64["nll_nats"] < k1["nll_nats"] - 0.5  # tighter with more samples
    assert k64["bits_per_dim"] == pytest.approx(k64["nll_nats"] / (256 * 0.6931471805599453))


def test_cvae_conditions_on_labels():
    torch.manual_seed(0)
    model = ConditionalVAE(CVAEConfig(arch="mlp", image_size=16, hidden=16, latent_dim=4, num_classes=3))
    x, y = images(4), torch.tensor([0, 1, 2, 1])
    out = model(x, y)
    assert torch.isfinite(out.loss)
    samples = model.sample(y=torch.tensor([2, 0, 1, 1, 0]))
    assert samples.shape == (5, 1, 16, 16)
    with torch.no_grad():  # the label changes the decoded image
        z = torch.zeros(1, 4)
        assert not torch.allclose(model.decode(z, torch.tensor([0])), model.decode(z, torch.tensor([1])))
    with pytest.raises(ValueError, match="labels"):
        model.sample(y=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="labels"):
        model.sample(3, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        model(x)
    scores = importance_weighted_nll(model, x, y, k=4)
    assert scores["nll_nats"] <= scores["elbo_nats"]


def test_temperature_zero_sampling_is_deterministic():
    torch.manual_seed(0)
    model = GaussianVAE(VAEConfig(arch="mlp", image_size=16, hidden=16, latent_dim=4))
    assert torch.equal(model.sample(3, temperature=0.0), model.sample(3, temperature=0.0))
    assert not torch.equal(model.sample(3), model.sample(3))


def test_paths_and_attribute_arithmetic():
    z0, z1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    straight = lerp(z0, z1, 5)
    assert torch.allclose(straight[0], z0) and torch.allclose(straight[-1], z1)
    assert torch.allclose(straight[2], torch.tensor([0.5, 1.0]))
    arc = slerp(z0, z1, 5)
    assert torch.allclose(arc[0], z0, atol=1e-6) and torch.allclose(arc[-1], z1, atol=1e-6)
    assert float(arc[2].norm()) > float(straight[2].norm())  # the arc bulges out
    codes, labels = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 5.0]]), torch.tensor([0, 0, 1])
    vector = attribute_vector(codes, labels, 0, 1)
    assert torch.allclose(vector, torch.tensor([2.0, -4.0]))
    moved = apply_attribute(codes[2:], vector, [0.0, 1.0])
    assert torch.allclose(moved, torch.tensor([[0.0, 5.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="classes"):
        attribute_vector(codes, labels, 0, 7)


def test_interpolation_grid_to_png(tmp_path):
    torch.manual_seed(0)
    model = GaussianVAE(VAEConfig(image_size=16, hidden=8, latent_dim=4))
    x = images(4)
    assert encode(model, x).shape == (4, 4)
    paths = interpolate(model, x[:2], x[2:], steps=5)
    assert paths.shape == (10, 1, 16, 16)
    grid = make_grid(paths, nrow=5, padding=2)
    assert grid.shape == (1, 2 * 18 + 2, 5 * 18 + 2)
    png = save_png_grid(paths, tmp_path / "grid.png", nrow=5)
    with Image.open(png) as image:
        assert image.size == (5 * 18 + 2, 2 * 18 + 2)
    with pytest.raises(ValueError, match="C in 1 or 3"):
        save_png_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


def test_training_image_panels_work_for_the_conditional_vae():
    """Image logging walks latent paths under the pair's labels; a CVAE's encoder needs them."""
    from tokenmill.models.vae import ConditionalVAE, CVAEConfig
    from tokenmill.pipeline.training.tasks.image_validation import image_panels

    model = ConditionalVAE(CVAEConfig()).eval()
    x, y = torch.rand(8, model.config.channels, 32, 32), torch.arange(8) % 10
    panels = dict(image_panels(model, x, y))
    assert set(panels) == {"reconstructions", "samples", "interpolations"}
    assert panels["interpolations"].shape[0] == model.config.channels
