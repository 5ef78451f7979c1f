"""Hierarchical VAE: per-group KL, zero-initialised priors, bounded scales, temperature sampling."""

from __future__ import annotations

import pytest
import torch

from tokenmill.models.hvae import HierarchicalVAE, HVAEConfig, soft_clamp
from tokenmill.models.image_metrics import importance_weighted_nll


def small_hvae(**overrides) -> HierarchicalVAE:
    torch.manual_seed(0)
    config = dict(image_size=16, width=8, latent_channels=2, resolutions=(8, 4, 2))
    return HierarchicalVAE(HVAEConfig(**{**config, **overrides}))


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(5)).round()


def randomize_priors(model: HierarchicalVAE) -> None:
    """Give the zero-initialised prior convs weights, as training would."""
    with torch.no_grad():
        for group in model.groups:
            group.prior[-1].weight.normal_(0.0, 0.3)
            group.prior[-1].bias.normal_(0.0, 0.3)


def test_forward_reports_kl_per_group_at_every_resolution():
    model = small_hvae(groups_per_resolution=2)
    out = model(images())
    names = [k for k in out.metrics if k.startswith("kl/")]
    assert names == ["kl/2x2.0", "kl/2x2.1", "kl/4x4.0", "kl/4x4.1", "kl/8x8.0", "kl/8x8.1"]
    assert torch.allclose(sum(out.metrics[k] for k in names), out.metrics["rate"], rtol=1e-5)
    assert torch.allclose(out.metrics["elbo"], -(out.metrics["distortion"] + out.metrics["rate"]))
    assert out.recon.shape == (4, 1, 16, 16)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_priors_start_as_standard_normal():
    model = small_hvae()
    h = torch.randn(3, 8, 2, 2)
    mu, raw_log_std, feature = model.groups[0].prior_params(h)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(raw_log_std, torch.zeros_like(raw_log_std))
    assert torch.equal(feature, torch.zeros_like(feature))


def test_log_scales_are_bounded():
    x = torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4])
    y = soft_clamp(x)
    assert float(y.abs().max()) <= 5.0 and torch.allclose(y[1:4], x[1:4], atol=0.6)


def test_temperature_zero_sampling_is_deterministic():
    model = small_hvae()
    randomize_priors(model)
    torch.manual_seed(1)
    a = model.sample(3, temperature=0.0)
    torch.manual_seed(2)
    b = model.sample(3, temperature=0.0)
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16)
    assert not torch.allclose(model.sample(3, temperature=1.0), model.sample(3, temperature=1.0))


def test_iw_bound_for_hvae_uses_all_groups():
    model = small_hvae()
    randomize_priors(model)
    x = images(6)
    log_px_z, log_pz, log_qz = model.log_terms(x, k=3)
    assert log_px_z.shape == log_pz.shape == log_qz.shape == (3, 6)
    torch.manual_seed(0)
    k1 = importance_weighted_nll(model, x, k=1)
    torch.manual_seed(0)
    k32 = importance_weighted_nll(model, x, k=32)
    assert k32["nll_nats"] <= k32["elbo_nats"] and k32["nll_nats"] < k1["nll_nats"]
    # the single-sample log-weight estimates the analytic ELBO of forward()
    torch.manual_seed(0)
    analytic = -float(model(x).metrics["elbo"])
    assert k32["elbo_nats"] == pytest.approx(analytic, rel=0.05)


def test_invalid_resolutions_fail_early():
    with pytest.raises(ValueError, match="resolutions"):
        small_hvae(resolutions=(6, 3))


def test_encode_gives_deterministic_posterior_means_that_decode_reconstructs():
    model = small_hvae(groups_per_resolution=2)
    x = images(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # fit x without the KL term, so the posterior carries x's information
        optimizer.zero_grad()
        model(x, kl_weight=0.0).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        mu, logvar = model.encode(x)
        torch.manual_seed(2)
        again, _ = model.encode(x)
        # 2 groups each at 2x2, 4x4 and 8x8 with 2 channels
        assert mu.shape == logvar.shape == (8, 2 * 2 * (4 + 16 + 64))
        assert torch.equal(mu, again)
        recon = model.decode(mu)
        sampled = model(x).recon
    assert recon.shape == x.shape
    mean_mse, sampled_mse = float(((recon - x) ** 2).mean()), float(((sampled - x) ** 2).mean())
    assert mean_mse <= sampled_mse * 1.1 + 1e-3, (mean_mse, sampled_mse)
    assert mean_mse < 0.5 * float(((x.mean() - x) ** 2).mean())  # far better than a constant image
