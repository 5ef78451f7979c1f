"""Hierarchical VAE in the VDVAE/NVAE line, small enough to train on a CPU.

Bottom-up: x -> (space-to-depth stem) -> residual blocks at every resolution, keeping the
activation at each latent resolution. Top-down: from a learned constant at the coarsest
resolution, every latent group predicts its prior p(z_i | z_<i) from the top-down state h,
the posterior q(z_i | x, z_<i) as a residual on the prior (μp + Δμ, log σp + Δlog σ, NVAE),
samples z_i and folds it back into h. Log-scales are soft-clamped to ±5; the prior's output
conv starts at zero, so every group starts as N(0, I) with no extra input to h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.models.gaussian import kl_normal, log_normal
from tokenmill.models.likelihoods import make_likelihood
from tokenmill.models.ranges import STRICT, NonNegative, Positive, PositiveInt
from tokenmill.models.serialization import register_model
from tokenmill.models.vae import VAEOutput, assemble_output

LOG_SCALE_BOUND = 5.0


def soft_clamp(x: torch.Tensor, bound: float = LOG_SCALE_BOUND) -> torch.Tensor:
    """Smoothly bounds x to (−bound, bound) with gradients everywhere (NVAE)."""
    return bound * torch.tanh(x / bound)


@dataclass
class HVAEConfig:
    kind: Literal["hvae"] = "hvae"
    image_size: PositiveInt = 32
    channels: PositiveInt = 1
    width: PositiveInt = 32  # channels of the bottom-up and top-down residual streams
    latent_channels: PositiveInt = 8  # channels of each latent group
    resolutions: tuple[int, ...] = (16, 8, 4)  # latent group resolutions (powers-of-two steps)
    groups_per_resolution: PositiveInt = 1
    blocks_per_resolution: PositiveInt = 1  # bottom-up residual blocks at each resolution
    likelihood: Literal["bernoulli", "gaussian", "dlogistic"] = "bernoulli"
    sigma: Positive = 0.1
    learn_sigma: bool = False
    n_mix: PositiveInt = 5
    free_bits: NonNegative = 0.0  # nats per latent channel of each group, loss only

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        self.resolutions = tuple(int(r) for r in self.resolutions)  # JSON gives lists back


class ResBlock(nn.Module):
    """h + conv3x3(gelu(conv3x3(gelu(h)))); the output conv starts small so deep stacks start near identity."""

    def __init__(self, width: int, scale: float):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(F.gelu(self.conv1(F.gelu(h))))


class TopDownGroup(nn.Module):
    """One latent group at one resolution: prior, residual posterior, z -> h."""

    def __init__(self, width: int, zc: int, res_scale: float):
        super().__init__()
        self.zc = zc
        self.prior = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(width, 2 * zc + width, 1))
        nn.init.zeros_(self.prior[-1].weight)  # prior starts at N(0, I), adds nothing to h
        nn.init.zeros_(self.prior[-1].bias)
        self.posterior = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.GELU(),
                                       nn.Conv2d(width, 2 * zc, 1))
        with torch.no_grad():
            self.posterior[-1].weight.mul_(0.1)  # posterior starts close to the prior
        self.z_proj = nn.Conv2d(zc, width, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(res_scale)
        self.block = ResBlock(width, res_scale)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, W, r, r) -> prior μ, log σ (B, zc, r, r) and the prior's feature (B, W, r, r)."""
        out = self.prior(h)
        mu, raw_log_std, feature = out[:, : self.zc], out[:, self.zc : 2 * self.zc], out[:, 2 * self.zc :]
        return mu, raw_log_std, feature

    def forward(
        self, h: torch.Tensor, enc: torch.Tensor | None, temperature: float = 1.0,
        z: torch.Tensor | None = None, posterior_mean: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Advance h by one group. A given z (B, zc, r, r) is used as is; else with `enc` (bottom-up
        activation) z ~ q (its mean with `posterior_mean`), else z ~ p(·; temperature)."""
        p_mu, p_raw, feature = self.prior_params(h)
        p_log_std = soft_clamp(p_raw)
        stats: dict[str, torch.Tensor] = {}
        if z is not None:
            pass  # decoding given latents: no posterior, no stats
        elif enc is not None:
            d_mu, d_raw = self.posterior(torch.cat([h, enc], dim=1)).chunk(2, dim=1)
            q_mu, q_log_std = p_mu + d_mu, soft_clamp(p_raw + d_raw)
            z = q_mu if posterior_mean else q_mu + torch.exp(q_log_std) * torch.randn_like(q_mu)
            stats["q_mu"], stats["q_log_std"] = q_mu, q_log_std  # (B, zc, r, r)
            stats["kl"] = kl_normal(q_mu, 2 * q_log_std, p_mu, 2 * p_log_std)  # (B, zc, r, r)
            stats["log_q"] = log_normal(z, q_mu, 2 * q_log_std).flatten(1).sum(1)  # (B,)
            stats["log_p"] = log_normal(z, p_mu, 2 * p_log_std).flatten(1).sum(1)  # (B,)
        elif temperature == 0.0:
            z = p_mu
        else:
            z = p_mu + temperature * torch.exp(p_log_std) * torch.randn_like(p_mu)
        h = self.block(h + feature + self.z_proj(z))
        return h, stats


@register_model
class HierarchicalVAE(nn.Module):
    config_class = HVAEConfig
    has_kl = True

    def __init__(self, config: HVAEConfig):
        super().__init__()
        self.config = c = config
        self.resolutions = sorted({int(r) for r in c.resolutions}, reverse=True)  # fine -> coarse
        top = self.resolutions[0] if self.resolutions else 0
        if not top or c.image_size % top or any(top % r for r in self.resolutions):
            raise ValueError(f"resolutions {c.resolutions} must divide image_size {c.image_size} and each other")
        self.patch = c.image_size // top  # space-to-depth factor: the stem works at the finest latent resolution
        self.likelihood = make_likelihood(c.likelihood, c.channels, c.sigma, c.learn_sigma, c.n_mix)
        n_blocks = len(self.resolutions) * (c.blocks_per_resolution + c.groups_per_resolution)
        res_scale = 1.0 / math.sqrt(n_blocks)
        w = c.width
        self.stem = nn.Conv2d(c.channels * self.patch**2, w, 3, padding=1)
        self.encoder = nn.ModuleList(
            nn.Sequential(*[ResBlock(w, res_scale) for _ in range(c.blocks_per_resolution)]) for _ in self.resolutions
        )
        coarse = self.resolutions[-1]
        self.h_top = nn.Parameter(torch.zeros(1, w, coarse, coarse))
        self.groups = nn.ModuleList(
            TopDownGroup(w, c.latent_channels, res_scale)
            for _ in self.resolutions for _ in range(c.groups_per_resolution)
        )
        # A per-position MLP maps each feature to its patch² pixels' likelihood params (cheap: it
        # runs at the finest latent resolution, not per pixel).
        self.out = nn.Sequential(nn.Conv2d(w, 4 * w, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(4 * w, self.likelihood.param_channels * self.patch**2, 1))
        self.group_names = [
            f"{r}x{r}" if c.groups_per_resolution == 1 else f"{r}x{r}.{g}"
            for r in reversed(self.resolutions) for g in range(c.groups_per_resolution)
        ]

    def bottom_up(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """x (B, C, H, W) -> activation (B, W, r, r) at every latent resolution r."""
        h = self.stem(F.pixel_unshuffle(x * 2.0 - 1.0, self.patch))
        acts: dict[int, torch.Tensor] = {}
        for r, blocks in zip(self.resolutions, self.encoder):
            if h.shape[-1] != r:
                h = F.avg_pool2d(h, h.shape[-1] // r)
            h = blocks(h)
            acts[r] = h
        return acts

    def _top_down(self, batch: int, acts: dict[int, torch.Tensor] | None, temperature: float = 1.0,
                  latents: list[torch.Tensor] | None = None, posterior_mean: bool = False):
        """Run all groups coarse -> fine (with the given per-group `latents`, if any); returns the
        likelihood params and per-group stats."""
        h = self.h_top.expand(batch, -1, -1, -1)
        per_group: list[dict[str, torch.Tensor]] = []
        groups = iter(self.groups)
        given = iter(latents) if latents is not None else None
        for r in reversed(self.resolutions):
            if h.shape[-1] != r:
                h = F.interpolate(h, scale_factor=r // h.shape[-1], mode="nearest")
            for _ in range(self.config.groups_per_resolution):
                h, stats = next(groups)(h, None if acts is None else acts[r], temperature,
                                        next(given) if given is not None else None, posterior_mean)
                per_group.append(stats)
        params = F.pixel_shuffle(self.out(F.gelu(h)), self.patch)  # (B, P, H, W)
        return params, per_group

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_weight: float = 1.0) -> VAEOutput:
        params, per_group = self._top_down(x.shape[0], self.bottom_up(x))
        kls = [g["kl"] for g in per_group]  # each (B, zc, r, r)
        kl_units = torch.cat([kl.sum((2, 3)) for kl in kls], dim=1)  # (B, groups·zc): channels per group
        group_kl = {name: kl.flatten(1).sum(1) for name, kl in zip(self.group_names, kls)}
        return assemble_output(
            self.likelihood.log_prob(params, x), kl_units, self.likelihood.mean(params),
            kl_weight, self.config.free_bits, group_kl,
        )

    def log_terms(
        self, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k posterior samples per image -> log p(x|z), Σ_i log p(z_i|z_<i), Σ_i log q(z_i|x, z_<i), each (k, B)."""
        b = x.shape[0]
        acts = {r: a.repeat(k, 1, 1, 1) for r, a in self.bottom_up(x).items()}  # bottom-up once, (k·B, ...)
        params, per_group = self._top_down(k * b, acts)
        log_px_z = self.likelihood.log_prob(params, x.repeat(k, 1, 1, 1))
        log_pz = torch.stack([g["log_p"] for g in per_group]).sum(0)
        log_qz = torch.stack([g["log_q"] for g in per_group]).sum(0)
        return log_px_z.view(k, b), log_pz.view(k, b), log_qz.view(k, b)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n images (n, C, H, W) from the prior; temperature scales every group's σ (0: deterministic)."""
        params, _ = self._top_down(n, None, temperature)
        return self.likelihood.mean(params)

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(zc, r, r) of every latent group, coarse -> fine (the order of `encode`'s code)."""
        zc, per_res = self.config.latent_channels, self.config.groups_per_resolution
        return [(zc, r, r) for r in reversed(self.resolutions) for _ in range(per_res)]

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> posterior μ, log σ² (B, L), every group's (zc, r, r) flattened
        and concatenated coarse -> fine. Deterministic: each group is conditioned on the posterior
        means of the groups above it, so `decode(μ)` is the mean-latent reconstruction."""
        _, per_group = self._top_down(x.shape[0], self.bottom_up(x), posterior_mean=True)
        mu = torch.cat([g["q_mu"].flatten(1) for g in per_group], dim=1)
        logvar = torch.cat([2 * g["q_log_std"].flatten(1) for g in per_group], dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, L) as `encode` lays it out -> mean images (B, C, H, W) in [0, 1]."""
        sizes = [math.prod(shape) for shape in self.latent_shapes]
        groups = [part.reshape(-1, *shape) for part, shape in zip(z.split(sizes, dim=1), self.latent_shapes)]
        params, _ = self._top_down(z.shape[0], None, latents=groups)
        return self.likelihood.mean(params)
