"""The Transformer prior: causality, KV cache == full forward, CFG at scale 1 == conditional,
top-k/top-p support, label dropout, save/load, and a tiny model learning a toy sequence set."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.models import load_model, save_model
from tokenmill.models.prior import KVCache, PriorConfig, TransformerPrior, sample_logits

K = 16


# Tiny matmuls on a shared 2-core machine are ~10x faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def _prior(positions: str = "rope2d", grid=((2, 2), (3, 3)), num_classes: int = 3, **kw) -> TransformerPrior:
    torch.manual_seed(0)
    config = PriorConfig(codebook_size=K, num_classes=num_classes, grid=[list(g) for g in grid], dim=32, depth=2,
                         heads=2, positions=positions, **kw)
    return TransformerPrior(config).eval()


def _tokens(model: TransformerPrior, labels: list[int], seed: int = 0) -> torch.Tensor:
    c = model.config
    codes = torch.randint(0, K, (len(labels), c.seq_len), generator=torch.Generator().manual_seed(seed))
    return torch.cat([model.prefix(len(labels), torch.tensor(labels)), codes], dim=1)  # (B, P + N)


@pytest.mark.parametrize("positions,tie", [("learned", False), ("rope2d", True)])
def test_causal_and_kv_cache_matches_full_forward(positions, tie):
    model = _prior(positions, tie_weights=tie)
    c = model.config
    tokens = _tokens(model, [0, 2, 1])
    full = model(tokens)  # (B, N, K)
    assert full.shape == (3, c.seq_len, K)
    # Causality: changing code t never changes the logits that predict codes 0..t.
    t = 5
    changed = tokens.clone()
    changed[:, c.prefix_len + t] = (changed[:, c.prefix_len + t] + 1) % K
    other = model(changed)
    torch.testing.assert_close(other[:, : t + 1], full[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(other[:, t + 1 :], full[:, t + 1 :])
    # KV cache: the prefix in one call, then one token per call.
    cache = KVCache(c.depth, c.prefix_len + c.seq_len)
    steps = [model.logits(model.hidden(tokens[:, : c.prefix_len], cache)[:, -1])]
    for i in range(c.prefix_len, tokens.shape[1] - 1):
        steps.append(model.logits(model.hidden(tokens[:, i : i + 1], cache)[:, -1]))
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # Sampling with and without the cache draws the same codes from the same generator.
    labels = torch.tensor([0, 1, 2, 1])
    cached = model.sample(4, labels, generator=torch.Generator().manual_seed(1))
    recomputed = model.sample(4, labels, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert cached.shape == (4, c.seq_len) and cached.dtype == torch.long
    assert cached.min() >= 0 and cached.max() < K
    assert torch.equal(cached, recomputed)


def test_cfg_at_scale_one_equals_conditional_and_guidance_changes_samples():
    model = _prior()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    conditional = model.sample(6, labels, generator=torch.Generator().manual_seed(3))
    # The guided path (conditional + null rows as one batch of 12) mixed at scale 1.
    guided_one = model.generate(model.prefix(6, labels), model.prefix(6, None), cfg_scale=1.0,
                                generator=torch.Generator().manual_seed(3))
    assert torch.equal(conditional, guided_one)
    # An untrained prior's logits are nearly flat: a low temperature makes guidance visible.
    cold = model.sample(6, labels, temperature=0.01, generator=torch.Generator().manual_seed(3))
    guided = model.sample(6, labels, cfg_scale=4.0, temperature=0.01, generator=torch.Generator().manual_seed(3))
    assert guided.shape == cold.shape and not torch.equal(guided, cold)
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2, None, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        _prior(num_classes=0).sample(2, torch.tensor([0, 1]))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.75, generator=gen).tolist()) == {0, 1, 2}  # 0.4+0.3 < 0.75
    assert set(sample_logits(logits, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.01, generator=gen).tolist()) == {0}  # the best code always stays
    assert set(sample_logits(logits, generator=gen).tolist()) == {0, 1, 2, 3, 4}
    codes = _prior().sample(8, torch.zeros(8, dtype=torch.long), top_k=1, generator=gen)
    assert torch.equal(codes, codes[:1].expand_as(codes))  # top-1 is greedy: every row the same


def test_label_dropout_and_save_load_round_trip(tmp_path):
    model = _prior("learned", label_dropout=0.5)
    tokens = _tokens(model, [0, 1, 2, 0])
    # Train mode with dropout 0.5 sees the null class on some rows: the loss differs across seeds.
    losses = set()
    for seed in range(6):
        torch.manual_seed(seed)
        losses.add(round(model.train().loss(tokens).item(), 6))
    assert len(losses) > 1
    model.eval()
    # The DDP path (`ddp(tokens, return_loss=True)`) is the same loss.
    assert model(tokens, return_loss=True).item() == model.loss(tokens).item()
    save_model(model, tmp_path / "prior")
    loaded = load_model(tmp_path / "prior")
    assert isinstance(loaded, TransformerPrior) and loaded.config == model.config
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.config.vocab() == {"codebook_size": K, "bos": K, "class_offset": K + 1, "num_classes": 3,
                                     "null_class": K + 4}


def test_tiny_prior_learns_a_toy_sequence_set():
    """Four fixed code sequences, one per class: the loss falls from ~ln K towards 0 and
    conditional samples reproduce each class's sequence."""
    model = _prior(grid=((3, 3),), num_classes=4, label_dropout=0.0)
    seqs = torch.randint(0, K, (4, 9), generator=torch.Generator().manual_seed(7))
    tokens = torch.cat([model.prefix(4, torch.arange(4)), seqs], dim=1).repeat(4, 1)  # (16, 11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = model.loss(tokens).item()
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        opt.step()
    assert first > 0.8 * math.log(K) and loss.item() < 0.1
    samples = model.sample(4, torch.arange(4), top_k=1)
    assert torch.equal(samples, seqs)
