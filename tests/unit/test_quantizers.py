"""Quantizer unit tests: straight-through gradients, EMA arithmetic, k-means init, dead-code
restarts, index round trips, FSQ bijection, fp32 under bf16 autocast, codebook statistics; the
rotation trick, the LFQ/BSQ entropy penalty, SimVQ's frozen codebook, LlamaGen-style codes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenmill.models.code_usage import CodebookStats
from tokenmill.models.quantizers import BSQ, FSQ, LFQ, Collectives, ResidualVQ, SimVQ, VectorQuantizer
from tokenmill.models.quantizers.entropy import entropy_penalty
from tokenmill.models.quantizers.rotation import rotate_onto


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
        lambda: VectorQuantizer(8, codebook_size=16, rotation_trick=True),
        lambda: VectorQuantizer(8, codebook_size=1024, codebook_dim=4, cosine=True, ema=False),
        lambda: LFQ(8, bits=5),
        lambda: LFQ(8, bits=8),
        lambda: BSQ(8, bits=18, group_bits=9),
        lambda: SimVQ(8, codebook_size=16, rotation_trick=True),
    ],
    ids=["vq", "cosine", "factorized", "codebook-loss", "rvq", "fsq", "rotation", "l2-lowdim", "lfq",
         "lfq-no-projection", "bsq-18bit", "simvq"],
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


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 4, 4), (7, 6)])
def test_fsq_is_the_reference_function(levels):
    """Given the same projection weights, our FSQ equals vector-quantize-pytorch's (the paper's
    Appendix A.1 code) bit for bit: codes, indices, decoded indices and the straight-through
    gradients. So a bench gap between the two is the projections' random init, not the formula."""
    from vector_quantize_pytorch import FSQ as PeerFSQ

    torch.manual_seed(0)
    peer, ours = PeerFSQ(levels=list(levels), dim=16), FSQ(16, levels)
    ours.project_in.load_state_dict(peer.project_in.state_dict())
    ours.project_out.load_state_dict(peer.project_out.state_dict())
    z = (3 * torch.randn(2, 64, 16)).requires_grad_()  # wide enough to reach every level's edge
    z_peer = z.detach().clone().requires_grad_()
    out = ours(z)
    codes, indices = peer(z_peer)
    weights = torch.randn_like(codes)
    (out.codes * weights).sum().backward()
    (codes * weights).sum().backward()
    assert torch.equal(out.codes, codes) and torch.equal(out.indices, indices.long())
    assert torch.equal(z.grad, z_peer.grad)
    assert torch.equal(ours.project_in.weight.grad, peer.project_in.weight.grad)
    assert torch.equal(ours.indices_to_codes(out.indices), peer.indices_to_codes(indices))


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


def test_rotation_trick_keeps_the_forward_and_rotates_the_gradient():
    torch.manual_seed(0)
    ste, rotation = VectorQuantizer(8, codebook_size=16), VectorQuantizer(8, codebook_size=16, rotation_trick=True)
    rotation.load_state_dict(ste.state_dict())
    z, upstream = torch.randn(64, 8), torch.randn(64, 8)
    outputs, grads = [], []
    for vq in (ste, rotation):
        zi = z.clone().requires_grad_(True)
        out = vq.train()(zi)  # same k-means init and update: same codes
        (out.codes * upstream).sum().backward()
        outputs.append(out)
        grads.append(zi.grad)
    assert torch.equal(outputs[0].codes, outputs[1].codes) and torch.equal(outputs[0].indices, outputs[1].indices)
    torch.testing.assert_close(grads[0], upstream)  # straight-through copies the gradient
    assert not torch.allclose(grads[1], grads[0], atol=1e-3)
    q = outputs[0].codes.detach()
    # λR maps e onto q, and its Jacobian is λR: the gradient is λRᵀg, of norm λ‖g‖.
    torch.testing.assert_close(rotate_onto(z, q), q, atol=1e-5, rtol=1e-5)
    scale = q.norm(dim=1) / z.norm(dim=1)
    torch.testing.assert_close(grads[1].norm(dim=1), scale * upstream.norm(dim=1))


def test_entropy_penalty_is_minimal_for_confident_uniform_codes():
    bits = 6
    every_code = ((torch.arange(2**bits)[:, None] >> torch.arange(bits)) & 1) * 2.0 - 1  # (64, 6) ±1
    confident = 50 * every_code.repeat(3, 1)  # each code used 3 times, bits certain
    log_k = bits * math.log(2)
    for group_bits in (6, 3, 1):  # exact, grouped, per bit: all reach the minimum −log K here
        uniform = entropy_penalty(confident, group_bits, 1.0, Collectives())
        assert abs(uniform.item() + log_k) < 1e-4, group_bits
    collapsed = entropy_penalty(50 * every_code[:1].repeat(192, 1), 6, 1.0, Collectives())
    unsure = entropy_penalty(torch.zeros(192, bits), 6, 1.0, Collectives())
    assert abs(collapsed.item()) < 1e-4 and abs(unsure.item()) < 1e-4  # no code diversity / no confidence
    half_used = entropy_penalty(50 * every_code[:32].repeat(6, 1), 6, 1.0, Collectives())
    assert abs(half_used.item() + log_k - math.log(2)) < 1e-4
    logits = torch.randn(192, bits, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = entropy_penalty(logits.bfloat16(), 3, 1.0, Collectives())
    assert penalty.dtype == torch.float32 and penalty.isfinite()
    assert -log_k <= penalty.item() <= log_k


def test_lfq_entropy_term_only_in_training():
    lfq = LFQ(4, bits=4, beta=0.0)
    z = torch.randn(32, 4)
    assert lfq.train()(z).loss.item() < 0  # the penalty is negative once codes differ
    assert lfq.eval()(z).loss.item() == 0
    bsq = BSQ(4, bits=4).eval()
    codes = bsq(torch.randn(32, 4)).codes
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(32))  # BSQ codes lie on the unit sphere


# Tiny training loops below: two threads on a loaded 2-core machine take ~50x longer than one
# (the one_thread fixture, tests/conftest.py).
@pytest.mark.parametrize("binary", [LFQ, BSQ], ids=["lfq", "bsq"])
def test_binary_quantizer_does_not_collapse_on_offset_latents(binary, one_thread):
    """An encoder's latents share an offset much larger than their spread (the bench's VQ-VAE:
    10-30x). Before the data-dependent init of project_in every row got one code at step 0 and
    stayed (LFQ: 8 of 64 codes after training, 1 at first); the init centres the bits."""
    torch.manual_seed(0)
    z = torch.randn(16) * 0.1 + 0.01 * torch.randn(512, 16)  # (512, 16): offset 10x the spread
    quantizer = binary(16, bits=6)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-2)
    for step in range(40):
        out = quantizer.train()(z)
        if step == 0:
            assert out.indices.unique().numel() >= 32  # centred before the first code is chosen
        loss = torch.nn.functional.mse_loss(out.codes, z) + out.loss  # project_out is the decoder
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert bool(quantizer.initted)
    assert quantizer.eval()(z).indices.unique().numel() >= 48  # of 64 codes, after training
    state = {k: v for k, v in quantizer.state_dict().items() if k != "initted"}  # saved before the init existed
    fresh = binary(16, bits=6)
    fresh.load_state_dict(state)
    assert bool(fresh.initted)  # a trained checkpoint is not re-initialised by its next training step


def test_simvq_codebook_stays_frozen_while_its_projection_learns():
    torch.manual_seed(0)
    simvq = SimVQ(8, codebook_size=32).train()
    frozen, codes_before = simvq.frozen_codebook.clone(), simvq.codebook().detach().clone()
    assert "frozen_codebook" in simvq.state_dict()
    assert all(p is not simvq.frozen_codebook for p in simvq.parameters())
    optimiser = torch.optim.SGD(simvq.parameters(), lr=0.5)
    for _ in range(3):
        optimiser.zero_grad()
        simvq(torch.randn(64, 8)).loss.backward()
        optimiser.step()
    assert torch.equal(simvq.frozen_codebook, frozen)
    assert not torch.allclose(simvq.codebook(), codes_before)  # all codes moved with W


def _codes_used_after_training(**options) -> int:
    """Distinct codes a held-out batch of 4,096 uses after 4 steps on correlated latents."""
    torch.manual_seed(0)
    vq = VectorQuantizer(32, codebook_size=16384, ema=False, kmeans_iters=1, **options).train()
    mixing = torch.randn(32, 32) / 32**0.5  # correlated latents, as an encoder would give
    optimiser = torch.optim.Adam(vq.parameters(), lr=1e-3)
    for _ in range(4):
        z = torch.randn(1024, 32) @ mixing
        out = vq(z)
        loss = out.loss + (out.codes - z).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return vq.eval()(torch.randn(4096, 32) @ mixing).indices.unique().numel()


def test_llamagen_l2_low_dim_large_codebook_trains_without_collapse():
    """16,384 l2-normalised 8-dim codes behind a learned projection (LlamaGen's VQ) spread a held-out
    batch over far more codes than unnormalised ones (measured: 1,876 vs 164 of 4,096 rows)."""
    llamagen = _codes_used_after_training(codebook_dim=8, cosine=True)
    plain = _codes_used_after_training(codebook_dim=8, cosine=False, kmeans_init=False, dead_code_threshold=0.0)
    assert llamagen > 1200 and plain < 400, (llamagen, plain)


def test_18_bit_lfq_tokenizer_gets_a_uint32_token_store(tmp_path):
    from tokenmill.models import save_model
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.vqvae import VQVAE, VQVAEConfig
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder

    config = VQVAEConfig(in_channels=1, image_size=16, hidden=8, res_blocks=1, latent_dim=8,
                         quantizer=QuantizerConfig(kind="lfq", bits=18, entropy_group_bits=9))
    model = VQVAE(config)
    assert model.codebook_size == 2**18
    encoder = TokenEncoder(resolve_model(str(save_model(model.eval(), tmp_path / "lfq18"))), latents=False)
    (spec,) = encoder.specs
    assert spec.dtype == "uint32" and spec.codebook_size == 2**18 and spec.row_shape == (4, 4)
    codes = encoder.encode(np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8),
                           np.zeros(3, dtype=np.int64))["codes"]
    assert codes.dtype == np.uint32
