"""Two real gloo processes on CPU, each fed different data, end with identical codebooks, equal to
one process fed both halves concatenated; k-means init and dead-code restarts included."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.quantizers import VectorQuantizer, distributed_collectives, set_collectives

pytestmark = pytest.mark.slow  # spawns two gloo processes

STEPS = 6
ROWS_PER_RANK = 96


def _data() -> torch.Tensor:
    """(STEPS, 2 * ROWS_PER_RANK, 4): new clusters every step, so old codes die and restart."""
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3 * STEPS, 4, generator=g)
    batches = []
    for step in range(STEPS):
        which = torch.randint(3, (2 * ROWS_PER_RANK,), generator=g) + step * 3
        batches.append(centers[which] + 0.2 * torch.randn(2 * ROWS_PER_RANK, 4, generator=g))
    return torch.stack(batches)


def _quantizer() -> VectorQuantizer:
    return VectorQuantizer(4, codebook_size=32, decay=0.5, kmeans_iters=5, dead_code_threshold=1.0, seed=7)


def _train(quantizer: VectorQuantizer, batches: torch.Tensor) -> int:
    """Runs the training steps; returns how many code restarts happened."""
    restarts, restart = [0], quantizer._restart_dead_codes

    def counting_restart(z: torch.Tensor) -> None:
        restarts[0] += int((quantizer.cluster_size < quantizer.dead_code_threshold).sum())
        restart(z)

    quantizer._restart_dead_codes = counting_restart
    quantizer.train()
    for batch in batches:
        quantizer(batch)
    return restarts[0]


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = [0]
    real = distributed_collectives()
    counting = type(real)(
        all_reduce=lambda t: (calls.__setitem__(0, calls[0] + 1), real.all_reduce(t)),
        broadcast=lambda t: (calls.__setitem__(0, calls[0] + 1), real.broadcast(t)),
        rank=real.rank, world_size=real.world_size,
    )
    quantizer = _quantizer()
    set_collectives(quantizer, counting)
    mine = _data()[:, rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]  # each rank its own half
    restarts = _train(quantizer, mine)
    torch.save({"state": quantizer.state_dict(), "calls": calls[0], "restarts": restarts}, f"{results}/{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_the_concatenation(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    single = _quantizer()
    restarts = _train(single, _data())

    assert ranks[0]["calls"] == ranks[1]["calls"] > 0
    assert restarts > 0 and ranks[0]["restarts"] == ranks[1]["restarts"] == restarts
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between ranks"
        torch.testing.assert_close(value, single.state_dict()[key], atol=1e-5, rtol=1e-5, msg=key)
