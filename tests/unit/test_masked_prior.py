"""The MaskGIT prior: decoding one code per step equals a plain greedy loop, guidance runs
conditional and null rows as one batch, the loss counts masked codes only (fixed masks in eval
mode), every parameter gets a gradient (DDP), a tiny one learns a toy set, the engine trains and
resumes it, its export samples as the checkpoint does, and `tokenmill sample --steps` / the config
refuse what does not apply."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS
from helpers.engine import prior_store, run_in_process

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models import load_model, save_model
from tokenmill.models.masked_prior import MaskGITConfig, MaskGITPrior, masked_after
from tokenmill.models.prior import PriorConfig, TransformerPrior
from tokenmill.pipeline.config import ConfigError, to_plain
from tokenmill.pipeline.prior.config import load_prior_config, prior_config
from tokenmill.pipeline.training.tasks.prior import PriorTask

K = 16

# Tiny matmuls on a shared 2-core machine are ~10x faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def _maskgit(num_classes: int = 3, grid=((4, 4),), **kw) -> MaskGITPrior:
    torch.manual_seed(0)
    config = MaskGITConfig(codebook_size=K, num_classes=num_classes, grid=[list(g) for g in grid], dim=32, depth=2,
                           heads=2, **kw)
    return MaskGITPrior(config).eval()


def _tokens(model: MaskGITPrior, labels: list[int], seed: int = 0) -> torch.Tensor:
    """(B, 2 + N) rows as the prior task feeds them: [BOS, class, codes]."""
    codes = torch.randint(0, K, (len(labels), model.config.seq_len), generator=torch.Generator().manual_seed(seed))
    return torch.cat([model.prefix(len(labels), torch.tensor(labels)), codes], dim=1)


@torch.no_grad()
def _greedy_reference(model: MaskGITPrior, classes: torch.Tensor) -> torch.Tensor:
    """The plain loop: every step, fill the one masked code whose most likely value is most likely."""
    c = model.config
    rows = torch.arange(classes.shape[0])
    codes = torch.full((classes.shape[0], c.seq_len), c.mask)
    for _ in range(c.seq_len):
        best, value = model.predict(torch.cat([classes, codes], dim=1)).log_softmax(-1).max(-1)  # (n, N) each
        position = best.masked_fill(codes != c.mask, -math.inf).argmax(-1)  # (n,)
        codes[rows, position] = value[rows, position]
    return codes


@pytest.mark.parametrize("positions,grid,num_classes", [("rope2d", ((2, 2), (3, 3)), 3), ("learned", ((3, 3),), 0)])
def test_one_code_per_step_greedy_decoding_equals_a_reference_loop(positions, grid, num_classes):
    model = _maskgit(num_classes, grid, positions=positions, choice_temperature=0.0)  # no noise on the ranking
    c = model.config
    labels = torch.tensor([0, 2, 1]) if num_classes else None
    # steps = N: the cosine schedule never asks to unmask more than one code per step.
    assert all(masked_after(t, c.seq_len, c.seq_len) >= c.seq_len - t - 1 for t in range(c.seq_len))
    sampled = model.sample(3, labels, top_k=1, steps=c.seq_len)  # top-1: the draw is the argmax
    assert torch.equal(sampled, _greedy_reference(model, model.prefix(3, labels)[:, 1:]))
    # Default steps (8 < N), with choice noise: every code filled, in range; seeded, reproducible.
    noisy = _maskgit(num_classes, grid, positions=positions)
    drawn = noisy.sample(3, labels, generator=torch.Generator().manual_seed(5))
    assert drawn.shape == (3, c.seq_len) and drawn.min() >= 0 and drawn.max() < K
    assert torch.equal(drawn, noisy.sample(3, labels, generator=torch.Generator().manual_seed(5)))


def test_guidance_mixes_conditional_and_null_rows_of_one_batch():
    model = _maskgit()
    c = model.config
    labels = torch.tensor([0, 1, 2])
    codes = torch.randint(0, K, (3, c.seq_len), generator=torch.Generator().manual_seed(1))
    codes[:, ::2] = c.mask  # half of them still unknown
    cond_classes, null_classes = model.prefix(3, labels)[:, 1:], model.prefix(3, None)[:, 1:]
    assert (null_classes == c.null_class).all() and (cond_classes[:, 0] == c.class_offset + labels).all()
    with torch.no_grad():
        cond = model.predict(torch.cat([cond_classes, codes], dim=1))
        uncond = model.predict(torch.cat([null_classes, codes], dim=1))
        guided = model.guided_logits(torch.cat([cond_classes, null_classes]), codes, cfg_scale=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    # Through `sample`: GPT-2's small initial weights make the class token barely heard; larger
    # random weights and a low temperature make guidance visible in the codes.
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.ndim == 2):
            weight.normal_(std=0.3, generator=torch.Generator().manual_seed(2))
    cold = model.sample(3, labels, temperature=0.01, generator=torch.Generator().manual_seed(3))
    steered = model.sample(3, labels, cfg_scale=4.0, temperature=0.01, generator=torch.Generator().manual_seed(3))
    assert steered.shape == cold.shape and not torch.equal(steered, cold)
    with pytest.raises(ValueError, match="class-conditional"):
        model.sample(2, None, cfg_scale=2.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.sample(2, labels[:2], steps=0)


def test_the_loss_counts_masked_codes_only_is_fixed_in_eval_mode_and_reaches_every_parameter():
    model = _maskgit(grid=((2, 2), (3, 3)), label_dropout=0.5, tie_weights=False)
    c = model.config
    tokens = _tokens(model, [0, 1, 2, 0, 1, 2])
    masked = model.draw_mask(6, tokens.device)  # eval mode: the fixed-seed masks
    counts = masked.sum(-1)
    assert torch.equal(masked, model.draw_mask(6, tokens.device)) and counts.min() >= 1 and len(set(counts.tolist())) > 1
    codes = tokens[:, c.prefix_len :]
    with torch.no_grad():
        logits = model.predict(torch.cat([tokens[:, 1:2], codes.masked_fill(masked, c.mask)], dim=1))  # (6, N, K)
        loss = model.loss(tokens)
    torch.testing.assert_close(loss, F.cross_entropy(logits[masked], codes[masked]), rtol=1e-6, atol=1e-6)
    assert abs(loss.item() - F.cross_entropy(logits.flatten(0, 1), codes.flatten()).item()) > 1e-4
    assert model(tokens, return_loss=True).item() == loss.item()  # the DDP path; the same masks again
    # Train mode: random masks and label dropout; every parameter gets a gradient (DDP: none unused).
    model.train()
    losses = set()
    for seed in range(4):
        torch.manual_seed(seed)
        model.zero_grad()
        step_loss = model.loss(tokens)
        step_loss.backward()
        losses.add(round(step_loss.item(), 6))
    assert len(losses) > 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_label_smoothing_mixes_the_masked_targets_in_training_and_leaves_validation_plain():
    """Smoothed cross-entropy is linear in epsilon: (1 - e) CE + e * mean_k(-log p_k), on the
    same masks and label drops (one seed); eval mode scores the plain cross-entropy."""
    model = _maskgit(label_dropout=0.5)
    tokens = _tokens(model, [0, 1, 2, 0])
    plain_eval = model.loss(tokens).item()
    model.config.label_smoothing = 0.1
    assert model.loss(tokens).item() == plain_eval
    model.train()

    def train_loss(smoothing: float) -> float:
        model.config.label_smoothing = smoothing
        torch.manual_seed(3)
        with torch.no_grad():
            return model.loss(tokens).item()

    plain, small, large = train_loss(0.0), train_loss(0.1), train_loss(0.5)
    assert abs(small - plain) > 1e-3 and large - plain == pytest.approx(5 * (small - plain), rel=1e-4)


def test_a_tiny_maskgit_prior_learns_a_toy_sequence_set():
    """Four fixed code sequences, one per class: the masked loss falls from ~ln K and
    conditional samples in 3 parallel steps reproduce each class's sequence."""
    model = _maskgit(num_classes=4, grid=((3, 3),), label_dropout=0.0, positions="learned")  # rope2d: ~3x the steps
    seqs = torch.randint(0, K, (4, 9), generator=torch.Generator().manual_seed(7))
    tokens = torch.cat([model.prefix(4, torch.arange(4)), seqs], dim=1).repeat(8, 1)  # (32, 11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    torch.manual_seed(0)
    first = model.loss(tokens).item()
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        opt.step()
    assert first > 0.8 * math.log(K) and loss.item() < 0.2
    assert torch.equal(model.sample(4, torch.arange(4), steps=3, generator=torch.Generator().manual_seed(0)), seqs)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return prior_store(tmp_path_factory.mktemp("maskgit-store"))


def _task(store: str, root, *overrides: str) -> PriorTask:
    return PriorTask(load_prior_config(CONFIGS / "debug_maskgit.yaml", [
        f"data.store={store}", f"run.root={root}", "train.sample_every=0", "train.val_every=3",
        "train.checkpoint_every=3", "optim.ema_decay=0.9", "optim.total_steps=6", *overrides]))


def test_the_engine_trains_and_resumes_it_and_its_export_samples_as_the_checkpoint(store, tmp_path):
    whole = run_in_process(_task(store, tmp_path / "whole", "train.steps=6"), tmp_path / "whole")
    run_in_process(_task(store, tmp_path / "parts", "train.steps=3"), tmp_path / "parts")
    resumed = run_in_process(_task(store, tmp_path / "parts", "train.steps=6"), tmp_path / "parts")
    assert resumed.context.reports[-1]["resumed_from_step"] == 3 and resumed.state.step == 6
    a, b = whole.train_state(), resumed.train_state()
    assert a["state"] == b["state"] and math.isfinite(a["state"]["last_val"]["val/bits_per_token"])
    for key in ("module", "ema"):
        weights_a, weights_b = a["parts"]["model"][key], b["parts"]["model"][key]
        assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # The export (as `fit` writes it: model + lineage) loads as a MaskGIT prior with the EMA weights.
    model_dir = whole.checkpoint() / "model"
    whole.task.export_extras(model_dir)
    loaded = load_model(model_dir).eval()
    assert isinstance(loaded, MaskGITPrior) and loaded.config.num_classes == 7
    fresh = MaskGITPrior(loaded.config).eval()
    fresh.load_state_dict(a["parts"]["model"]["ema"])
    labels = torch.tensor([1, 4, 6])
    draw = lambda m: m.sample(3, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(draw(loaded), draw(fresh))
    # `tokenmill sample --steps` draws it through its lineage's tokenizer.
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    assert cli_main(["sample", "--prior", str(model_dir), "--steps", "3", "--class", "4", "--n", "2", "--cfg", "2",
                     "--device", "cpu", "--out", str(out), "--json", str(summary)]) == 0
    codes = np.load(out / "codes.npy")
    assert codes.shape == (2, 4) and codes.max() < loaded.config.codebook_size
    assert json.loads(summary.read_text())["steps"] == 3


def _error_lines(stderr: str) -> list[str]:
    """stderr from the first `tokenmill ...: error:` line on (argparse prints its usage block first)."""
    lines = stderr.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("tokenmill")), 0)
    return lines[first:]


def test_steps_0_and_steps_on_an_ar_prior_and_foreign_fields_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["sample", "--prior", str(tmp_path), "--steps", "0", "--out", str(tmp_path / "out")])
    err = _error_lines(capsys.readouterr().err)
    assert exited.value.code == 2 and len(err) == 1 and "--steps: must be >= 1, got 0" in err[0], err
    ar = save_model(TransformerPrior(PriorConfig(codebook_size=K, grid=[[2, 2]], dim=16, depth=1, heads=2)),
                    tmp_path / "ar")
    assert cli_main(["sample", "--prior", str(ar), "--steps", "4", "--device", "cpu", "--out", str(tmp_path / "samples")]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "--steps" in err[0] and "kind: prior" in err[0] and "Traceback" not in err[0], err
    # The model section holds every kind's fields; a config sets only its own kind's.
    with pytest.raises(ValueError, match="sample_steps is not a field of a `kind: prior` prior.*kind: maskgit"):
        prior_config({"kind": "prior", "sample_steps": 4})
    assert prior_config({"kind": "maskgit", "sample_steps": 4}).sample_steps == 4
    assert type(prior_config({"dim": 64})) is PriorConfig
    with pytest.raises(ConfigError, match="sample_steps"):
        load_prior_config(CONFIGS / "debug_prior.yaml", ["model.sample_steps=4"])
    maskgit = load_prior_config(CONFIGS / "debug_maskgit.yaml")
    assert maskgit.model.config_fields()["kind"] == "maskgit" and to_plain(maskgit)["model"]["sample_steps"] == 2
    assert "sample_steps" not in to_plain(load_prior_config(CONFIGS / "debug_prior.yaml"))["model"]  # MLflow params
