"""The entropy penalty of lookup-free quantizers (MAGVIT-v2, BSQ), for codes that are sign bits.

A soft assignment p(c | z) ∝ exp(−τ‖z − c‖²) over codes c ∈ {±s}^d factorises into independent
bits, p(bit_i = +1 | z) = sigmoid(a_i) with a_i = 4τ·s·z_i (the ‖c‖² term is the same for all
codes). So the per-sample entropy is exactly the sum of the bits' entropies, with no 2^d table.
The codebook entropy H(E_z p(c | z)) does not factorise; it is computed over groups of at most
`group_bits` bits (exact when the code has no more bits than that; otherwise a sum over groups,
the Open-MAGVIT2 / BSQ approximation, an upper bound of the joint entropy).

Global batch: the mean distribution is all-reduced (one collective per call) in fp32. Its value is
the global mean on every rank; its gradient flows only into this rank's rows, scaled by
world_size / global_rows so that DDP's gradient *average* equals the gradient one process would
get for the concatenated batch (a plain all-reduce would carry no gradient to the other ranks'
rows, and a detached one would divide the gradient by world_size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.models.quantizers.collectives import Collectives


def bit_entropy(logits: Tensor) -> Tensor:
    """(..., d) bit logits -> (...) summed Bernoulli entropies in nats."""
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).sum(-1)


def bit_groups(bits: int, group_bits: int) -> list[int]:
    """Sizes of ceil(bits / group_bits) groups of near-equal size, e.g. 18, 9 -> [9, 9]."""
    groups = math.ceil(bits / group_bits)
    return [bits // groups + (i < bits % groups) for i in range(groups)]


def _group_log_probs(logits: Tensor) -> Tensor:
    """(N, g) bit logits -> (N, 2^g) log p(sub-code) (bit i of the sub-code index = bit i)."""
    g = logits.shape[1]
    codes = torch.arange(2**g, device=logits.device)
    on = ((codes[None, :] >> torch.arange(g, device=logits.device)[:, None]) & 1).to(logits.dtype)  # (g, 2^g)
    return F.logsigmoid(logits) @ on + F.logsigmoid(-logits) @ (1 - on)


def entropy_penalty(logits: Tensor, group_bits: int, diversity: float, collectives: Collectives) -> Tensor:
    """Per-sample entropy (mean over rows, minimised: confident bits) minus `diversity` × codebook
    entropy of the global mean distribution (maximised: every code used). logits (N, d), fp32."""
    logits = logits.float()
    per_sample = bit_entropy(logits).mean()
    parts = [_group_log_probs(chunk).exp().sum(0) for chunk in logits.split(bit_groups(logits.shape[1], group_bits), 1)]
    sums = torch.cat(parts)  # (Σ 2^g,) this rank's summed group distributions
    stats = torch.cat([sums.detach(), sums.new_full((1,), logits.shape[0])])  # new_full: no host-to-device copy
    collectives.all_reduce(stats)  # (Σ 2^g + 1,) global sums | global rows
    rows = stats[-1].clamp(min=1)
    mean = stats[:-1] / rows + (sums - sums.detach()) * (collectives.world_size / rows)
    codebook = sum(-(p * p.clamp(min=1e-12).log()).sum() for p in mean.split([part.numel() for part in parts]))
    return per_sample - diversity * codebook
