"""Gaussian KL and reparameterization, decoder likelihoods against torch references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from tokenmill.models.errors import UserError
from tokenmill.models.gaussian import kl_normal, kl_standard_normal, log_normal, reparameterize
from tokenmill.models.likelihoods import (
    BernoulliLikelihood,
    DiscretizedLogisticMixture,
    GaussianLikelihood,
    make_likelihood,
)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu_q, logvar_q = torch.tensor([0.7, -1.2, 0.0]), torch.tensor([-0.5, 0.3, -2.0])
    mu_p, logvar_p = torch.tensor([0.2, 0.4, -0.3]), torch.tensor([0.1, -0.4, 0.5])
    z = reparameterize(mu_q.expand(200_000, 3), logvar_q.expand(200_000, 3))  # (S, 3)
    log_q = log_normal(z, mu_q, logvar_q)
    mc_std = (log_q - Normal(0.0, 1.0).log_prob(z)).mean(0)
    mc_pair = (log_q - log_normal(z, mu_p, logvar_p)).mean(0)
    assert torch.allclose(kl_standard_normal(mu_q, logvar_q), mc_std, atol=0.02)
    assert torch.allclose(kl_normal(mu_q, logvar_q, mu_p, logvar_p), mc_pair, atol=0.02)
    reference = kl_divergence(Normal(mu_q, (0.5 * logvar_q).exp()), Normal(mu_p, (0.5 * logvar_p).exp()))
    assert torch.allclose(kl_normal(mu_q, logvar_q, mu_p, logvar_p), reference, atol=1e-5)


def test_gradients_reach_mu_and_sigma_through_the_sample():
    mu = torch.zeros(4, requires_grad=True)
    logvar = torch.zeros(4, requires_grad=True)
    torch.manual_seed(0)
    (reparameterize(mu, logvar) ** 2).sum().backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_temperature_zero_returns_the_mean():
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(reparameterize(mu, logvar, temperature=0.0), mu)


def test_bernoulli_matches_binary_cross_entropy():
    torch.manual_seed(0)
    logits, x = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4).round()
    reference = -F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="none").flatten(1).sum(1)
    assert torch.allclose(BernoulliLikelihood(1).log_prob(logits, x), reference, atol=1e-4)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_gaussian_matches_normal_log_prob(learn_sigma):
    torch.manual_seed(0)
    lik = GaussianLikelihood(3, sigma=0.3, learn_sigma=learn_sigma)
    mean, x = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    reference = Normal(mean, 0.3).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(lik.log_prob(mean, x), reference, atol=1e-4)
    assert any(p is lik.log_sigma for p in lik.parameters()) == learn_sigma


@pytest.mark.parametrize("channels", [1, 3])
def test_discretized_logistic_sums_to_one_over_256_bins(channels):
    torch.manual_seed(0)
    lik = DiscretizedLogisticMixture(channels, n_mix=3)
    params = torch.randn(1, lik.param_channels, 1, 1).expand(256, -1, -1, -1)  # one pixel, 256 candidates
    params = params.clone()
    params[:, 3 + 3 * channels :] = params[:, 3 + 3 * channels :] * 0.5 - 3.0  # scales ~ e^-3: narrow but resolvable
    bins = torch.arange(256.0).view(256, 1, 1, 1).expand(-1, channels, -1, -1) / 255.0  # every channel = k
    if channels == 1:
        total = lik.log_prob(params, bins).exp().sum()
    else:  # channels are independent given the mixture indicator: check one channel's marginal
        lik1 = DiscretizedLogisticMixture(1, n_mix=3)
        one = torch.cat([params[:, :3], params[:, 3:6], params[:, 3 + 3 * channels : 6 + 3 * channels]], 1)
        total = lik1.log_prob(one, bins[:, :1]).exp().sum()
    assert abs(float(total) - 1.0) < 1e-3
    mean = lik.mean(params[:1])
    assert mean.shape == (1, channels, 1, 1) and 0.0 <= float(mean.min()) and float(mean.max()) <= 1.0


def test_discretized_logistic_samples_are_8_bit():
    lik = DiscretizedLogisticMixture(1, n_mix=2)
    sample = lik.sample(torch.randn(2, lik.param_channels, 4, 4))
    assert torch.allclose(sample * 255.0, (sample * 255.0).round(), atol=1e-4)
    assert math.isclose(float(sample.clamp(0, 1).sum()), float(sample.sum()))


def test_unknown_likelihood_names_the_choices():
    with pytest.raises(UserError, match="bernoulli"):
        make_likelihood("poisson", 1)
