"""Decoder likelihoods p(x | z): Bernoulli, Gaussian and discretized logistic mixture.

A likelihood turns the decoder's raw output `params` (B, P, H, W) into per-image log
probabilities (B,) (summed over C·H·W), a reconstruction in [0, 1] and samples. `P` is
`param_channels`, which the decoder asks for before building its output layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.errors import UserError

LikelihoodName = Literal["bernoulli", "gaussian", "dlogistic"]
LIKELIHOODS = ("bernoulli", "gaussian", "dlogistic")


class BernoulliLikelihood(nn.Module):
    """Binary (or [0, 1] soft) targets; params are logits (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.param_channels = channels

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # with-logits BCE is the numerically stable −log Bernoulli(x; sigmoid(params)).
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(params))


class GaussianLikelihood(nn.Module):
    """Continuous targets; params are means (B, C, H, W); σ fixed or one learned σ per channel."""

    def __init__(self, channels: int, sigma: float = 0.1, learn_sigma: bool = False):
        super().__init__()
        self.param_channels = channels
        log_sigma = torch.full((channels,), math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma, persistent=False)  # config decides σ

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_sigma = self.log_sigma.view(1, -1, 1, 1)  # (1, C, 1, 1)
        z = (x - params) * torch.exp(-log_sigma)
        return (-0.5 * (z**2 + math.log(2 * math.pi)) - log_sigma).flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.clamp(0.0, 1.0)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(params) * torch.exp(self.log_sigma).view(1, -1, 1, 1)
        return (params + noise).clamp(0.0, 1.0)


class DiscretizedLogisticMixture(nn.Module):
    """8-bit images (PixelCNN++ style): targets are the 256 bins x·255; the mixture indicator is
    shared by a pixel's channels, channels are independent given it. params (B, M(1+2C), H, W)."""

    def __init__(self, channels: int, n_mix: int = 5):
        super().__init__()
        self.channels, self.n_mix = channels, n_mix
        self.param_channels = n_mix * (1 + 2 * channels)

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = params.shape
        m, c = self.n_mix, self.channels
        logits = params[:, :m]  # (B, M, H, W)
        means = params[:, m : m + m * c].view(b, m, c, h, w)  # in [-1, 1] data units
        log_scales = params[:, m + m * c :].view(b, m, c, h, w).clamp(min=-7.0)
        return logits, means, log_scales

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits, means, log_scales = self._split(params)
        bins = torch.round(x * 255.0).unsqueeze(1)  # (B, 1, C, H, W) integers 0..255
        centered = bins / 127.5 - 1.0 - means
        inv_scale = torch.exp(-log_scales)
        plus_in = inv_scale * (centered + 1.0 / 255.0)
        min_in = inv_scale * (centered - 1.0 / 255.0)
        log_cdf_plus = F.logsigmoid(plus_in)  # bin 0 takes all mass below its upper edge
        log_one_minus_cdf_min = -F.softplus(min_in)  # bin 255 takes all mass above its lower edge
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_scale * centered
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
        # When the bin mass underflows, the density times the bin width is the accurate value.
        log_mid = torch.where(
            cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - math.log(127.5)
        )
        log_bins = torch.where(bins < 0.5, log_cdf_plus, torch.where(bins > 254.5, log_one_minus_cdf_min, log_mid))
        per_mix = log_bins.sum(2) + F.log_softmax(logits, dim=1)  # (B, M, H, W)
        return torch.logsumexp(per_mix, dim=1).flatten(1).sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        logits, means, _ = self._split(params)
        weights = torch.softmax(logits, dim=1).unsqueeze(2)  # (B, M, 1, H, W)
        return ((weights * means.clamp(-1.0, 1.0)).sum(1) + 1.0) / 2.0

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        logits, means, log_scales = self._split(params)
        pick = torch.distributions.Categorical(logits=logits.movedim(1, -1)).sample()  # (B, H, W)
        onehot = F.one_hot(pick, self.n_mix).movedim(-1, 1).unsqueeze(2).to(means.dtype)  # (B, M, 1, H, W)
        mu = (onehot * means).sum(1)
        scale = torch.exp((onehot * log_scales).sum(1))
        u = torch.rand_like(mu).clamp(1e-5, 1.0 - 1e-5)
        value = mu + scale * (torch.log(u) - torch.log1p(-u))
        return torch.round((value.clamp(-1.0, 1.0) + 1.0) * 127.5) / 255.0


def make_likelihood(name: str, channels: int, sigma: float = 0.1, learn_sigma: bool = False, n_mix: int = 5) -> nn.Module:
    if name == "bernoulli":
        return BernoulliLikelihood(channels)
    if name == "gaussian":
        return GaussianLikelihood(channels, sigma, learn_sigma)
    if name == "dlogistic":
        return DiscretizedLogisticMixture(channels, n_mix)
    raise UserError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
