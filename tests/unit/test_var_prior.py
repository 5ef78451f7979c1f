"""The VAR (next-scale) prior: the block-causal mask over scales, the KV cache over scales ==
full passes (logits and samples), the loss and label dropout, the DDP path, the engine training
it on a multi-scale store (resume, save, load, sample, `tokenmill sample`'s steps), and the
refusal of a grid or store that is not multi-scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import CONFIGS
from helpers.engine import multiscale_prior_store, prior_store, run_in_process

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models import load_model
from tokenmill.models.prior import KVCache
from tokenmill.models.var_prior import VARConfig, VARPrior, guidance_scales
from tokenmill.pipeline.prior.config import load_prior_config, prior_config
from tokenmill.pipeline.prior.sampling import SampleOptions, sample_prior, takes_steps
from tokenmill.pipeline.training.tasks.prior import PriorTask

K = 16
GRID = [[1, 1], [2, 2], [3, 3], [4, 4]]  # 1 + 4 + 9 + 16 = 30 codes
BOUNDS = [0, 1, 5, 14, 30]  # scale s holds codes [BOUNDS[s], BOUNDS[s + 1])
VAR_CONFIG = CONFIGS / "debug_var.yaml"

# Tiny matmuls on a shared 2-core machine are much faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def _var(positions: str = "learned", num_classes: int = 3, **kw) -> VARPrior:
    torch.manual_seed(0)
    config = VARConfig(codebook_size=K, num_classes=num_classes, grid=GRID, dim=32, depth=2, heads=2,
                       positions=positions, **kw)
    return VARPrior(config).eval()


def _tokens(model: VARPrior, labels: list[int]) -> torch.Tensor:
    """The AR prior's batch: [BOS, class, codes of every scale] (B, 2 + 30)."""
    codes = torch.randint(0, K, (len(labels), model.config.seq_len), generator=torch.Generator().manual_seed(0))
    return torch.cat([model.prefix(len(labels), torch.tensor(labels)), codes], dim=1)


def test_block_causal_mask_lets_scale_s_see_exactly_the_scales_up_to_s():
    model = _var()
    mask = model.block_mask  # (30, 30), True = may attend
    for s in range(len(GRID)):
        rows = mask[BOUNDS[s] : BOUNDS[s + 1]]
        assert rows[:, : BOUNDS[s + 1]].all() and not rows[:, BOUNDS[s + 1] :].any(), s
    tokens = _tokens(model, [0, 2])
    full = model(tokens)  # (2, 30, K)
    assert full.shape == (2, 30, K)
    for s in range(len(GRID)):
        changed = tokens.clone()
        changed[:, 2 + BOUNDS[s + 1] - 1] = (changed[:, 2 + BOUNDS[s + 1] - 1] + 1) % K  # scale s's last code
        other = model(changed)
        # Scale s's codes are inputs of the finer scales only: the logits of scales <= s stay.
        torch.testing.assert_close(other[:, : BOUNDS[s + 1]], full[:, : BOUNDS[s + 1]], rtol=0, atol=0)
        if s + 1 < len(GRID):  # ...and those of scale s + 1 see it
            assert not torch.allclose(other[:, BOUNDS[s + 1] : BOUNDS[s + 2]], full[:, BOUNDS[s + 1] : BOUNDS[s + 2]])


@pytest.mark.parametrize("positions", ["learned", "rope2d"])
def test_kv_cache_over_scales_gives_the_full_pass_logits_and_samples(positions):
    model = _var(positions, interpolation="nearest" if positions == "rope2d" else "bilinear")
    tokens = _tokens(model, [0, 1, 2])
    full = model(tokens)
    inputs = model.inputs(tokens[:, 1], tokens[:, 2:])  # (3, 30, dim): block s predicts scale s
    cache = KVCache(model.config.depth, model.config.seq_len)
    per_scale = [model.logits(model.hidden(inputs[:, a:b], cache)) for a, b in zip(BOUNDS, BOUNDS[1:])]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(per_scale, dim=1), full, rtol=1e-5, atol=1e-5)

    labels = torch.tensor([0, 1, 2, 1])
    for cfg in (1.0, 3.0):  # conditional rows alone, and with the null rows in the same batch
        cached = model.sample(4, labels, cfg_scale=cfg, top_k=8, generator=torch.Generator().manual_seed(1))
        recomputed = model.sample(4, labels, cfg_scale=cfg, top_k=8, generator=torch.Generator().manual_seed(1),
                                  use_cache=False)
        assert cached.shape == (4, 30) and cached.dtype == torch.long and 0 <= cached.min() and cached.max() < K
        assert torch.equal(cached, recomputed)
    assert not takes_steps(model)  # `tokenmill sample --steps` is refused for it, as for the AR prior


def test_guidance_ramps_from_none_at_the_coarsest_scale_to_cfg_at_the_finest():
    """VAR's schedule: scale 0 (1x1, the overall ink) is drawn from the plain conditional logits,
    the finest from the fully guided ones; "constant" guides scale 0 too. Greedy draws (top_k=1)
    make each scale's code the argmax of the logits it was drawn from."""
    assert guidance_scales(3.0, 4, "linear") == pytest.approx([1.0, 5 / 3, 7 / 3, 3.0])
    assert guidance_scales(3.0, 4, "constant") == [3.0] * 4
    labels = torch.tensor([0, 1, 2])
    for schedule in ("linear", "constant"):
        model = _var(cfg_schedule=schedule)
        cond, null = model(_tokens(model, [0, 1, 2]))[:, 0], model(_tokens(model, [-1, -1, -1]))[:, 0]  # (3, K); -1: null
        guided = null + 3.0 * (cond - null)
        assert not torch.equal(cond.argmax(-1), guided.argmax(-1))  # the schedule shows in the first code
        first = model.sample(3, labels, cfg_scale=3.0, top_k=1)[:, 0]
        assert torch.equal(first, (cond if schedule == "linear" else guided).argmax(-1))


def test_the_loss_is_nats_per_code_and_label_dropout_swaps_the_class_for_null():
    model = _var(label_dropout=0.5)
    tokens = _tokens(model, [0, 1, 2, 0, 1, 2])
    logits = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 2:].flatten())
    torch.testing.assert_close(model.loss(tokens), expected)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    losses = {round(model.loss(tokens).item(), 6) for _ in range(6)}
    assert len(losses) > 1  # some draws replaced classes with the null token


def test_every_parameter_learns_through_a_ddp_wrapper():
    """The engine's DDP path, `ddp(tokens, return_loss=True)`, in a one-rank gloo group in this
    process: DDP refuses a second step when a parameter got no gradient, and none is left out."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _var().train()
    tokens = _tokens(model, [0, 1, 2])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        for _ in range(2):
            model.zero_grad()
            ddp(tokens, return_loss=True).backward()
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_var_config_needs_square_scales_growing_coarse_to_fine():
    for grid, cause in (([[8, 8]], "one level 8x8"), ([[2, 2], [4, 2]], "square"), ([[4, 4], [2, 2]], "square")):
        with pytest.raises(ValueError, match=cause):
            VARConfig(codebook_size=K, grid=grid)
    assert VARConfig(grid=[[1, 1], [2, 2]]).seq_len == 5
    # The job config's model section holds every kind's fields; a kind refuses another's.
    with pytest.raises(ValueError, match="interpolation is not a field of a `kind: prior` prior; remove it or set kind: var"):
        prior_config({"kind": "prior", "interpolation": "nearest"})
    assert isinstance(prior_config({"kind": "var", "grid": GRID, "dim": 32, "heads": 2}), VARConfig)


def test_a_var_prior_on_a_single_level_store_is_refused_in_one_line(tmp_path, capsys):
    store = prior_store(tmp_path)  # one level of 2x2 codes
    code = cli_main(["train-prior", str(VAR_CONFIG), "--set", f"data.store={store}", "--set", f"run.root={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "needs a multi-scale store" in err[0] and "one level 2x2" in err[0] and "multiscale" in err[0], err
    assert not (tmp_path / "ray").exists()


@pytest.fixture(scope="module")
def scale_store(tmp_path_factory) -> str:
    return multiscale_prior_store(tmp_path_factory.mktemp("var-store"))


def _task(store: str, root, *overrides: str) -> PriorTask:
    return PriorTask(load_prior_config(VAR_CONFIG, [
        f"data.store={store}", f"run.root={root}", "train.sample_every=0", "train.val_every=3",
        "train.checkpoint_every=3", "optim.ema_decay=0.9", "optim.total_steps=6", *overrides]))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_engine_trains_resumes_saves_and_samples_a_var_prior(scale_store, tmp_path):
    """6 steps in one go == 3 steps, killed, resumed to 6 (weights, EMA, counters); the exported
    model loads as a VARPrior that samples what the trained weights sample, and `tokenmill
    sample`'s steps decode it with the store's tokenizer."""
    whole = run_in_process(_task(scale_store, tmp_path / "whole", "train.steps=6"), tmp_path / "whole")
    run_in_process(_task(scale_store, tmp_path / "parts", "train.steps=3"), tmp_path / "parts")
    resumed = run_in_process(_task(scale_store, tmp_path / "parts", "train.steps=6"), tmp_path / "parts")
    report = resumed.context.reports[-1]
    assert report["resumed_from_step"] == 3 and resumed.state.step == 6
    assert math.isfinite(report["val/bits_per_token"]) and report["tokens_per_s"] == pytest.approx(
        20 * report["seq_per_s"])  # 2x2 + 4x4 codes per sequence
    a, b = whole.train_state(), resumed.train_state()
    assert a["state"] == b["state"]
    for key in ("module", "ema"):
        assert _same(a["parts"]["model"][key], b["parts"]["model"][key]), key

    model_dir = whole.checkpoint() / "model"
    whole.task.export_extras(model_dir)  # lineage.json, as the driver writes it
    loaded = load_model(model_dir)
    assert isinstance(loaded, VARPrior) and loaded.config.grid == [[2, 2], [4, 4]]
    trained = VARPrior(prior_config(whole.task.model_fields))
    trained.load_state_dict(a["parts"]["model"]["ema"])  # the export is the EMA
    labels = torch.tensor([0, 3, 6])
    draw = lambda m: m.sample(3, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))  # noqa: E731
    assert torch.equal(draw(loaded), draw(trained))

    summary = sample_prior(str(model_dir), tmp_path / "out", classes=[1, 4], n=2,
                           options=SampleOptions(cfg_scale=2.0, seed=1), device="cpu")
    codes = np.load(tmp_path / "out" / "codes.npy")
    assert codes.shape == (4, 20) and codes.max() < 64 and summary.classes == [1, 4]
    assert (tmp_path / "out" / "samples.png").is_file()
