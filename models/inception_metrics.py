"""The formulas of FID, Inception Score and precision/recall on Inception features, in float64
torch, as torch-fidelity computes them (tests/unit/test_inception_metrics.py checks them against
scipy, brute force and torch-fidelity's own functions).

  FID (Heusel et al. 2017): |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2), with
      tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues of S_a S_b) (real parts), TTUR's / torch-fidelity's
      form: it needs no matrix square root, so N < 2048 (singular covariances) still works.
  IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over `splits` chunks of the logits,
      mean and std across chunks; torch-fidelity shuffles the rows first (numpy RandomState(2020)),
      which the caller passes in as `order`.
  Precision / recall (Kynkaenniemi et al. 2019, k = 3): each set's k-NN radius per point (its
      (k+1)-th smallest distance, the first being itself); precision = share of generated points
      inside some real point's ball, recall = share of real points inside some generated one's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PR_NEIGHBOURS = 3
IS_SPLITS = 10


@dataclass(frozen=True)
class FeatureStats:
    """mu (D,) and sigma (D, D) of a feature set, float64; n rows it came from."""

    mu: Tensor
    sigma: Tensor
    n: int

    @classmethod
    def of(cls, features: Tensor) -> "FeatureStats":
        """features (N, D), N >= 2: mean and unbiased covariance (numpy's np.cov(rowvar=False))."""
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"feature statistics need (N >= 2, D) features, got {tuple(features.shape)}")
        x = features.double()
        return cls(x.mean(0), torch.cov(x.T), x.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two Gaussians (float64)."""
    diff = a.mu - b.mu
    eigenvalues = torch.linalg.eigvals(a.sigma @ b.sigma)  # complex; tiny imaginary/negative parts are rounding
    trace_sqrt = torch.sqrt(eigenvalues.to(torch.complex128)).real.sum()
    return float(diff.dot(diff) + a.sigma.trace() + b.sigma.trace() - 2 * trace_sqrt)


def inception_score(logits: Tensor, splits: int = IS_SPLITS, order: Tensor | None = None) -> tuple[float, float]:
    """logits (N, C) -> (mean, std) of exp(mean KL) over `splits` contiguous chunks (after `order`)."""
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    x = (logits if order is None else logits[order]).double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        chunk = slice(i * n // splits, (i + 1) * n // splits)
        q = p[chunk].mean(dim=0, keepdim=True)  # (1, C) marginal over the chunk
        scores.append((p[chunk] * (log_p[chunk] - q.log())).sum(dim=1).mean().exp())
    scores_t = torch.stack(scores)
    return float(scores_t.mean()), float(scores_t.std(unbiased=False))  # np.std: population


def _knn_radii(x: Tensor, k: int, batch: int) -> Tensor:
    """(N,) distance of each row of x (N, D) to its k-th nearest other row."""
    return torch.cat([torch.cdist(rows, x).kthvalue(k + 1, dim=1).values for rows in x.split(batch)])


def _covered(points: Tensor, centres: Tensor, radii: Tensor, batch: int) -> Tensor:
    """(P,) bool: whether each point lies within radius of some centre (distance <= radius)."""
    return torch.cat([(torch.cdist(rows, centres) <= radii[None]).any(dim=1) for rows in points.split(batch)])


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS, batch: int = 1024) -> tuple[float, float]:
    """real (N, D), fake (M, D) -> (precision, recall), in float64; memory O(batch x max(N, M))."""
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated images")
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _knn_radii(real, k, batch), batch).double().mean()
    recall = _covered(real, fake, _knn_radii(fake, k, batch), batch).double().mean()
    return float(precision), float(recall)
