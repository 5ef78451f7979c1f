"""Importance-weighted estimate of log p(x) (Burda et al. 2016), next to the ELBO.

log p(x) ≥ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x): tighter as K grows and equal
to the ELBO's single-sample estimate at K = 1. A model provides
`log_terms(x, y, k) -> (log p(x|z), log p(z), log q(z|x))`, each (k, B); this module chunks K so
one forward pass sees at most `max_batch` rows (k·B), and reports nats per image.
Also PSNR, so the VQ family's training metrics, validation and benchmarks compute it alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def log_weights(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 100, max_batch: int = 4096
) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x) for k posterior samples: (k, B)."""
    chunk = max(1, min(k, max_batch // max(1, x.shape[0])))
    parts = []
    for start in range(0, k, chunk):
        log_px_z, log_pz, log_qz = model.log_terms(x, y, k=min(chunk, k - start))
        parts.append(log_px_z + log_pz - log_qz)
    return torch.cat(parts, dim=0)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1] from their mean squared error (any shape)."""
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def bits_per_dim(nats: Any, dims: int) -> Any:
    """Nats per image (a float or a tensor) -> bits per dimension."""
    return nats / (dims * math.log(2.0)) if dims else float("nan")


@torch.no_grad()
def iw_bounds(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 100, max_batch: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the importance-weighted bound on log p(x) and the ELBO (mean of the same log w), each (B,)."""
    lw = log_weights(model, x, y, k, max_batch)  # (k, B)
    return torch.logsumexp(lw, dim=0) - math.log(k), lw.mean(0)


@torch.no_grad()
def importance_weighted_nll(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 100,
    batch_size: int = 100,
    max_batch: int = 4096,
) -> dict[str, float]:
    """Mean over images of −log p(x) (IW bound, K samples) and −ELBO (mean of the same log w).

    x (N, C, H, W), y (N,) or None. Returns nll_nats, elbo_nats (the negative ELBO, so lower is
    better for both), bits_per_dim (of nll) and k.
    """
    was_training = model.training
    model.eval()
    iw_sum, elbo_sum = 0.0, 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        yb = None if y is None else y[start : start + batch_size]
        iw, elbo = iw_bounds(model, xb, yb, k, max_batch)  # (b,), (b,)
        iw_sum += float(iw.sum())
        elbo_sum += float(elbo.sum())
    model.train(was_training)
    n = x.shape[0]
    nll = -iw_sum / n
    return {"nll_nats": nll, "elbo_nats": -elbo_sum / n, "bits_per_dim": bits_per_dim(nll, x[0].numel()), "k": k}
