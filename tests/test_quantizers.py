"""Quantizer unit tests: straight-through gradients, EMA arithmetic, k-means init, dead-code
restarts, index round trips, FSQ bijection, fp32 under bf16 autocast, codebook statistics."""

from __future__ import annotations

import math

import pytest
import torch

from models.codebook_stats import CodebookStats
from models.quantizers import FSQ, ResidualVQ, VectorQuantizer


def _plain_vq(**options) -> VectorQuantizer:
    """A VQ with a known codebook and no k-means / restarts, so updates are pure EMA."""
    options = {"kmeans_init": False, "dead_code_threshold": 0.0, **options}
    vq = VectorQuantizer(2, codebook_size=3, **options)
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        if vq.ema:
            vq.embed_sum.copy_(vq.embed)
            vq.cluster_size.fill_(1.0)
    return vq


Z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [1.1, 0.0], [0.0, 0.8]])  # nearest codes 0, 1, 1, 2


def test_ema_update_matches_hand_computation():
    vq = _plain_vq(decay=0.9, eps=1e-5).train()
    out = vq(Z)
    assert out.indices.tolist() == [0, 1, 1, 2]
    d, eps = 0.9, 1e-5
    counts = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    sums = torch.tensor([[0.1, 0.0], [2.0, 0.1], [0.0, 0.8]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cluster = d * 1.0 + (1 - d) * counts
    embed_sum = d * old + (1 - d) * sums
    n = cluster.sum()
    expected = embed_sum / ((cluster + eps) / (n + 3 * eps) * n)[:, None]
    torch.testing.assert_close(vq.cluster_size.double(), cluster)
    torch.testing.assert_close(vq.embed.double(), expected)
    # EMA mode: the loss is the commitment term only, against the pre-update codebook.
    commit = ((Z - old[[0, 1, 1, 2]].float()) ** 2).mean()
    torch.testing.assert_close(out.loss, 0.25 * commit)


def test_no_update_in_eval_or_no_grad():
    vq = _plain_vq()
    before = vq.state_dict()
    vq.eval()(Z)
    with torch.no_grad():
        vq.train()(Z)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_straight_through_gradients_reach_the_input():
    for vq in (_plain_vq(), _plain_vq(ema=False)):
        z = Z.clone().requires_grad_(True)
        vq.train()(z).codes.sum().backward()
        torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity through the lookup
    z = Z.clone().requires_grad_(True)
    FSQ(2, levels=(5, 5)).train()(z).codes.sum().backward()
    assert (z.grad > 0).all()  # rounding passes the tanh bound's gradient through


def test_codebook_loss_trains_the_codebook_without_ema():
    vq = _plain_vq(ema=False).train()
    vq(Z).loss.backward()
    assert vq.embed.grad is not None and vq.embed.grad.abs().sum() > 0


def test_kmeans_init_converges_to_centroids():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-5.0, -5.0], [5.0, -5.0], [-5.0, 5.0], [5.0, 5.0]])
    z = (centers[torch.arange(400) % 4] + 0.3 * torch.randn(400, 2, generator=g))
    vq = VectorQuantizer(2, codebook_size=8, kmeans_init=True, kmeans_iters=20, dead_code_threshold=0.0).train()
    vq(z)
    assert bool(vq.initted) and vq.cluster_size.sum() == 400
    assign = vq.distances(z).argmin(1)
    for k in assign.unique():  # a Lloyd fixed point: every used code is the mean of its rows
        torch.testing.assert_close(vq.embed[k], z[assign == k].mean(0), atol=1e-4, rtol=0)


def test_dead_codes_restart_at_encoder_outputs():
    vq = VectorQuantizer(2, codebook_size=4, kmeans_init=False, decay=0.5, dead_code_threshold=0.5).train()
    with torch.no_grad():
        vq.embed.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [100.0, -100.0], [-100.0, 100.0]]))
        vq.embed_sum.copy_(vq.embed)
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    vq(z)
    for k in (1, 2, 3):  # never chosen: restarted to (distinct) rows of the batch
        assert (vq.embed[k] == z).all(1).any(), f"code {k} was not restarted"
    assert len({tuple(vq.embed[k].tolist()) for k in (1, 2, 3)}) == 3
    assert (vq.cluster_size[1:] == 0.5).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: VectorQuantizer(8, codebook_size=16),
        lambda: VectorQuantizer(8, codebook_size=16, cosine=True),
        lambda: VectorQuantizer(8, codebook_size=16, codebook_dim=3),
        lambda: VectorQuantizer(8, codebook_size=16, ema=False),
        lambda: ResidualVQ(8, num_stages=3, codebook_size=16, codebook_dim=4),
        lambda: FSQ(8, levels=(4, 3, 5)),
    ],
    ids=["vq", "cosine", "factorized", "codebook-loss", "rvq", "fsq"],
)
def test_indices_to_codes_round_trip(make):
    torch.manual_seed(0)
    quantizer = make()
    z = torch.randn(4, 5, 6, 8)
    quantizer.train()(z)  # k-means init / a first update
    quantizer.eval()
    out = quantizer(z)
    assert out.indices.dtype == torch.int64
    assert int(out.indices.max()) < quantizer.codebook_size
    assert torch.equal(quantizer.indices_to_codes(out.indices), out.codes)


def test_residual_stages_reduce_the_error():
    torch.manual_seed(0)
    z = torch.randn(512, 8)
    errors = []
    for stages in (1, 4):
        rvq = ResidualVQ(8, num_stages=stages, codebook_size=16).train()
        rvq(z)
        errors.append(float((rvq.eval()(z).codes - z).pow(2).mean()))
    assert errors[1] < 0.6 * errors[0]


def test_fsq_is_a_bijection_on_its_grid():
    fsq = FSQ(4, levels=(8, 5, 5, 3))
    indices = torch.arange(fsq.codebook_size)
    grid = fsq.indices_to_grid(indices)  # (1000, 4)
    assert torch.equal(fsq.grid_to_indices(grid), indices)
    assert len(torch.unique(grid, dim=0)) == fsq.codebook_size == 8 * 5 * 5 * 3
    assert grid.min() >= -1 and grid.max() <= 1
    out = fsq(torch.randn(256, 4) * 3)  # every forward lands on the grid, all levels reachable
    assert torch.equal(fsq.indices_to_grid(out.indices), out.codes)


def test_distances_and_ema_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    z = torch.randn(64, 8).bfloat16().float()  # exactly representable in bf16
    plain = VectorQuantizer(8, codebook_size=16, decay=0.9).train()
    cast = VectorQuantizer(8, codebook_size=16, decay=0.9).train()
    cast.load_state_dict(plain.state_dict())
    expected = plain(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cast.distances(z.bfloat16()).dtype == torch.float32
        out = cast(z.bfloat16())
    assert out.codes.dtype == torch.float32
    assert torch.equal(out.indices, expected.indices)
    for name, buffer in cast.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
            torch.testing.assert_close(buffer, dict(plain.named_buffers())[name])


def test_codebook_stats_accumulate_over_batches():
    stats = CodebookStats(4)
    stats.update(torch.tensor([[0, 0], [1, 1]]))
    stats.update(torch.tensor([0, 2]))
    assert stats.counts.tolist() == [[3, 2, 1, 0]]
    assert stats.usage == 0.75
    p = torch.tensor([3, 2, 1]) / 6
    assert math.isclose(stats.perplexity, math.exp(-(p * p.log()).sum().item()), rel_tol=1e-6)
    rvq_stats = CodebookStats(4, stages=2)
    rvq_stats.update(torch.tensor([[0, 3], [1, 3]]))  # (N, stages)
    assert rvq_stats.counts.tolist() == [[1, 1, 0, 0], [0, 0, 0, 2]]
