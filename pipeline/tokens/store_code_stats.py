"""Dataset-level codebook statistics: per-code counts merged from every shard, usage, perplexity.

Each writer counts its own shard's codes (exact integers), so merging is a plain sum and the
result does not depend on which actor finished first. Counts travel sparse (only used codes)
because codebooks can have millions of entries.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.models.code_usage import usage_and_perplexity


def count_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """codes (any shape, ints in [0, K)) -> int64 (K,) counts."""
    return np.bincount(codes.reshape(-1).astype(np.int64), minlength=codebook_size)[:codebook_size]


def to_sparse(counts: np.ndarray) -> dict[str, list[int]]:
    used = np.flatnonzero(counts)
    return {"codes": used.tolist(), "counts": counts[used].tolist()}


def from_sparse(sparse: dict[str, list[int]], codebook_size: int) -> np.ndarray:
    counts = np.zeros(codebook_size, dtype=np.int64)
    counts[np.asarray(sparse["codes"], dtype=np.int64)] = np.asarray(sparse["counts"], dtype=np.int64)
    return counts


def summarize(counts: np.ndarray) -> dict[str, float | int]:
    """(K,) counts -> tokens, used codes, usage and perplexity (`models.code_usage`)."""
    total = int(counts.sum())
    if total == 0:
        return {"tokens": 0, "used_codes": 0, "usage": 0.0, "perplexity": 0.0}
    usage, perplexity = usage_and_perplexity(torch.from_numpy(np.asarray(counts))[None])  # (1, K)
    return {"tokens": total, "used_codes": int(np.count_nonzero(counts)), "usage": float(usage),
            "perplexity": float(perplexity)}
