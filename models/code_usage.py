"""Codebook usage over a whole evaluation set: per-code counts, usage fraction, perplexity.

A per-batch perplexity says little about a 512-code book fed 64 images; `CodebookStats`
accumulates counts over every batch. Indices of a residual quantizer (..., stages) are counted
per stage.
"""

from __future__ import annotations

import torch
from torch import Tensor


def code_counts(indices: Tensor, codebook_size: int, stages: int = 1) -> Tensor:
    """(S, K) int64 counts of `indices` ((...) for one stage, (..., S) for S stages). A scatter-add
    into a fixed-size table, not `bincount`: bincount reads the largest index back to the host (a
    GPU sync on every training forward that logs usage)."""
    flat = indices.reshape(-1, stages).long()  # (N, S)
    offsets = torch.arange(stages, device=flat.device) * codebook_size
    counts = torch.zeros(stages * codebook_size, dtype=torch.long, device=flat.device)
    counts.index_add_(0, (flat + offsets).reshape(-1), torch.ones_like(flat).reshape(-1))
    return counts.reshape(stages, codebook_size)


def usage_and_perplexity(counts: Tensor) -> tuple[Tensor, Tensor]:
    """From (S, K) counts: fraction of codes used at least once, and exp(entropy) of the code
    distribution (K when every code is equally likely, 1 when one code takes everything); both
    averaged over stages, as float64 scalars. The one place this formula lives: training metrics,
    validation and the token store's statistics all call it."""
    counts = counts.double()
    probs = counts / counts.sum(1, keepdim=True).clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum(1)  # (S,)
    return (counts > 0).double().mean(), entropy.exp().mean()


class CodebookStats:
    def __init__(self, codebook_size: int, stages: int = 1) -> None:
        self.codebook_size, self.stages = codebook_size, stages
        self.counts = torch.zeros(stages, codebook_size, dtype=torch.long)  # (S, K)

    def update(self, indices: Tensor) -> None:
        self.counts += code_counts(indices.detach(), self.codebook_size, self.stages).cpu()

    @property
    def usage(self) -> float:
        return float(usage_and_perplexity(self.counts)[0])

    @property
    def perplexity(self) -> float:
        return float(usage_and_perplexity(self.counts)[1])

    def as_dict(self) -> dict[str, float | list]:
        return {"usage": self.usage, "perplexity": self.perplexity, "counts": self.counts.tolist()}
