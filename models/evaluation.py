"""Importance-weighted estimate of log p(x) (Burda et al. 2016), next to the ELBO.

log p(x) ≥ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x): tighter as K grows and equal
to the ELBO's single-sample estimate at K = 1. A model provides
`log_terms(x, y, k) -> (log p(x|z), log p(z), log q(z|x))`, each (k, B); this module chunks K so
one forward pass sees at most `max_batch` rows (k·B), and reports nats per image.
"""

from __future__ import annotations

import math

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
        lw = log_weights(model, xb, yb, k, max_batch)  # (k, b)
        iw_sum += float((torch.logsumexp(lw, dim=0) - math.log(k)).sum())
        elbo_sum += float(lw.mean(0).sum())
    model.train(was_training)
    n = x.shape[0]
    dims = x[0].numel()
    nll = -iw_sum / n
    return {"nll_nats": nll, "elbo_nats": -elbo_sum / n, "bits_per_dim": nll / (dims * math.log(2.0)), "k": k}
