"""Two real gloo processes on CPU, each fed different data, end with identical quantizer states,
equal to one process fed both halves concatenated; k-means init and dead-code restarts included
for VQ. For every quantizer the rank losses average to the single-process loss and the gradients
(inputs and parameters, averaged as DDP does) equal the single-process ones — which is what the
LFQ/BSQ entropy penalty over the global batch must get right. One spawn runs every case."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenmill.models.quantizers import (
    BSQ,
    LFQ,
    MultiScaleQuantizer,
    QuantizerOutput,
    SimVQ,
    VectorQuantizer,
    distributed_collectives,
    set_collectives,
)

STEPS = 6
ROWS_PER_RANK = 96
WORLD = 2
CASES = {
    "vq": lambda: VectorQuantizer(4, codebook_size=32, decay=0.5, kmeans_iters=5, dead_code_threshold=1.0, seed=7),
    "vq-rotation": lambda: VectorQuantizer(4, codebook_size=32, decay=0.5, kmeans_iters=5, seed=7,
                                           rotation_trick=True),
    "lfq": lambda: LFQ(4, bits=4, inv_temperature=1.0),
    "bsq": lambda: BSQ(4, bits=6, inv_temperature=1.0, group_bits=3),  # projected, grouped entropy
    "simvq": lambda: SimVQ(4, codebook_size=32, seed=7),
    "multiscale": lambda: OnGrids(MultiScaleQuantizer(4, [1, 2, 4], codebook_size=32, decay=0.5, kmeans_iters=5, seed=7)),
}


class OnGrids(torch.nn.Module):
    """Rows (N, 4) as N / 16 images of 4x4 latents for a quantizer of grids (multiscale), and back."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, rows: torch.Tensor) -> QuantizerOutput:
        out = self.inner(rows.reshape(-1, 4, 4, rows.shape[-1]))  # (N / 16, 4, 4, dim)
        return QuantizerOutput(out.codes.reshape(rows.shape), out.indices, out.loss)


def _data() -> torch.Tensor:
    """(STEPS, 2 * ROWS_PER_RANK, 4): new clusters every step, so old codes die and restart."""
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3 * STEPS, 4, generator=g)
    batches = []
    for step in range(STEPS):
        which = torch.randint(3, (2 * ROWS_PER_RANK,), generator=g) + step * 3
        batches.append(centers[which] + 0.2 * torch.randn(2 * ROWS_PER_RANK, 4, generator=g))
    return torch.stack(batches)


def _quantizer(case: str) -> torch.nn.Module:
    torch.manual_seed(3)  # the same projections in every process
    return CASES[case]()


def _train(quantizer: torch.nn.Module, batches: torch.Tensor, average=lambda t: None) -> dict:
    """Runs the training steps with a loss and backward each; returns the restarts (VQ), the losses,
    the input gradients and the parameter gradients (after `average`, DDP's all-reduce mean)."""
    restarts, restart = [0], getattr(quantizer, "_restart_dead_codes", None)

    def counting_restart(z: torch.Tensor) -> None:
        restarts[0] += int((quantizer.cluster_size < quantizer.dead_code_threshold).sum())
        restart(z)

    if restart is not None:
        quantizer._restart_dead_codes = counting_restart
    quantizer.train()
    losses, input_grads, param_grads = [], [], []
    for batch in batches:
        z = batch.clone().requires_grad_(True)
        out = quantizer(z)
        loss = out.loss + out.codes.sin().mean()  # some decoder-like use of the codes
        quantizer.zero_grad()
        loss.backward()
        for p in quantizer.parameters():
            average(p.grad)
        losses.append(loss.detach())
        input_grads.append(z.grad)
        param_grads.append([p.grad.clone() for p in quantizer.parameters()])
    return {"restarts": restarts[0], "losses": torch.stack(losses), "input_grads": torch.stack(input_grads),
            "param_grads": param_grads}


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = [0]
    real = distributed_collectives()
    counting = type(real)(
        all_reduce=lambda t: (calls.__setitem__(0, calls[0] + 1), real.all_reduce(t)),
        broadcast=lambda t: (calls.__setitem__(0, calls[0] + 1), real.broadcast(t)),
        rank=real.rank, world_size=real.world_size,
    )

    def ddp_average(grad: torch.Tensor) -> None:
        dist.all_reduce(grad)
        grad /= world

    out = {}
    for case in CASES:
        quantizer = _quantizer(case)
        set_collectives(quantizer, counting)
        calls[0] = 0
        mine = _data()[:, rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK]  # each rank its own half
        result = _train(quantizer, mine, ddp_average)
        out[case] = {"state": quantizer.state_dict(), "calls": calls[0], **result}
    torch.save(out, f"{results}/{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_match_one_process_on_the_concatenation(rank_results, case):
    ranks = [results[case] for results in rank_results]
    single_quantizer = _quantizer(case)
    single = _train(single_quantizer, _data())

    assert ranks[0]["calls"] == ranks[1]["calls"]
    if case == "vq":
        assert ranks[0]["calls"] > 0
        assert single["restarts"] > 0 and ranks[0]["restarts"] == ranks[1]["restarts"] == single["restarts"]
    if case in ("lfq", "bsq"):
        # One all-reduce of the code distribution per step, plus the projection's one-off init
        # (bsq is projected; its centred weights must then agree on both ranks and the single run).
        assert ranks[0]["calls"] == STEPS + (case == "bsq")
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), f"{key} differs between ranks"
        torch.testing.assert_close(value, single_quantizer.state_dict()[key], atol=1e-5, rtol=1e-5, msg=key)
    close = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / WORLD, single["losses"], **close)
    # A rank's loss is a mean over its own rows: its input gradients are WORLD × the single ones.
    gathered = torch.cat([r["input_grads"] for r in ranks], dim=1) / WORLD
    torch.testing.assert_close(gathered, single["input_grads"], **close)
    for step in range(STEPS):
        for rank_grad, single_grad in zip(ranks[0]["param_grads"][step], single["param_grads"][step]):
            torch.testing.assert_close(rank_grad, single_grad, **close)
