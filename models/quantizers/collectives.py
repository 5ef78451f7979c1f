"""Collectives injected into quantizers: EMA statistics, k-means init and dead-code restarts.

Models know nothing of ranks: the training loop builds a `Collectives` (from torch.distributed, after
wrapping DDP) and hands it to every quantizer with `set_collectives(model, collectives)`. The
default is a single process: both functions are no-ops, rank 0 of a world of 1.

`rank` and `world_size` are carried only so `sample_rows` can emulate an all-gather with one sum
all-reduce: that is what lets every rank pick the *same global rows* a single process fed the
concatenated batches would pick (restart vectors and k-means seeds then match exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


def _noop(tensor: Tensor) -> None:
    return None


@dataclass(frozen=True)
class Collectives:
    all_reduce: Callable[[Tensor], None] = _noop  # in place: sum over ranks
    broadcast: Callable[[Tensor], None] = _noop  # in place: every rank gets rank 0's tensor (quantizers need none now)
    rank: int = 0
    world_size: int = 1


def distributed_collectives(group=None) -> Collectives:
    """The real collectives from torch.distributed, or the single-process no-ops when it is not
    initialised (so the same training code runs on a laptop)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Collectives()
    return Collectives(
        all_reduce=lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group),
        broadcast=lambda t: dist.broadcast(t, src=dist.get_global_rank(group, 0) if group else 0, group=group),
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
    )


def set_collectives(module: nn.Module, collectives: Collectives) -> int:
    """Give `collectives` to every quantizer under `module` (a model or its DDP wrapper);
    returns how many quantizers received them."""
    found = 0
    for child in module.modules():
        if hasattr(child, "collectives"):
            child.collectives = collectives
            found += 1
    return found


SPARE_SEED = 0x9E3779B97F4A7C15  # the golden-ratio constant: far from any seed of a nearby step


def _draw(total: int, m: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(m,) indices into [0, total): distinct when total >= m. Drawn on `device` from `generator`
    (a generator of that device), so nothing is copied from the host."""
    if total >= m:
        return torch.randperm(total, generator=generator, device=device)[:m]
    return torch.randint(total, (m,), generator=generator, device=device)


def sample_rows(rows: Tensor, m: int, generator: torch.Generator, collectives: Collectives) -> Tensor:
    """m rows (m, d) picked at random from the rank-ordered concatenation of every rank's `rows`
    (n, d); identical on every rank, and equal to what one process holding the concatenation
    would pick with the same generator (a generator of `rows`' device, seeded alike on every rank).

    No host read: when distributed the ranks' row counts are all-reduced on the device and each
    rank's offset is their cumsum. Every rank draws for world × n rows, which is the concatenation
    when every rank holds n rows (the engine's equal split): distinct rows, when there are enough,
    as one process would draw. Should the counts differ, `torch.where` takes draws with replacement
    over the true total instead, from a second generator (identical on every rank as well). Always
    two collectives when distributed, whatever the data."""
    n, world = rows.shape[0], collectives.world_size
    picks = _draw(world * n, m, generator, rows.device)  # (m,)
    offset: Tensor | int = 0
    if world > 1:
        counts = torch.zeros(world, dtype=torch.long, device=rows.device)
        counts[collectives.rank] = n
        collectives.all_reduce(counts)  # (world,) rows held by each rank
        ends = counts.cumsum(0)
        offset = ends[collectives.rank] - n
        # Its own seed, apart from every seed a quantizer derives from its step (seed + 2·step + stream).
        spare = torch.Generator(device=rows.device).manual_seed((generator.initial_seed() + SPARE_SEED) % 2**64)
        uniform = torch.rand(m, dtype=torch.float64, generator=spare, device=rows.device)
        anywhere = (uniform * ends[-1]).long().clamp(max=ends[-1] - 1)  # (m,) with replacement
        picks = torch.where((counts == n).all(), picks, anywhere)  # `n` is the same only if all are equal
    local = picks - offset
    mine = (local >= 0) & (local < n)  # (m,) picks this rank holds
    # Ranks that do not hold a pick contribute zeros, so the sum is the gathered row.
    out = rows[local.clamp(0, n - 1)] * mine.unsqueeze(1).to(rows.dtype)
    collectives.all_reduce(out)
    return out
