"""Diagonal Gaussians: reparameterized sampling, log densities and closed-form KL.

Every function works elementwise on `logvar` (log σ²) and returns a tensor of the input shape,
so callers choose which dims to sum (per latent unit, per group, per image).
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """z = μ + t·σ ⊙ ε with ε ~ N(0, I); gradients flow to μ and σ. t = 0 returns μ exactly."""
    if temperature == 0.0:
        return mu
    eps = torch.randn_like(mu)
    return mu + temperature * torch.exp(0.5 * logvar) * eps


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, σ²), elementwise."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, 1), elementwise."""
    return -0.5 * (LOG_2PI + z**2)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), elementwise."""
    return 0.5 * (mu**2 + torch.exp(logvar) - 1.0 - logvar)


def kl_normal(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(μq, σq²) ‖ N(μp, σp²)) = ½(log σp²/σq² + (σq² + (μq − μp)²)/σp² − 1), elementwise."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0)
