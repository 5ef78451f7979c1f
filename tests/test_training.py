"""KL schedules, free bits, learning-rate schedule and the shared TrainStep."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.schedules import KLSchedule, free_bits_rate
from models.training import OptimConfig, TrainStep, lr_factor
from models.vae import GaussianVAE, VAEConfig


def small_vae() -> GaussianVAE:
    torch.manual_seed(0)
    return GaussianVAE(VAEConfig(arch="mlp", image_size=8, hidden=16, latent_dim=4))


def batch() -> torch.Tensor:
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)).round()


def test_kl_schedules():
    assert KLSchedule(kind="constant", beta=4.0)(123) == 4.0
    linear = KLSchedule(kind="linear", beta=1.0, warmup_steps=100)
    assert [linear(s) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    cyc = KLSchedule(kind="cyclical", beta=2.0, cycle_steps=100, ramp_ratio=0.5)
    assert [cyc(s) for s in (0, 25, 50, 99, 100, 125)] == [0.0, 1.0, 2.0, 2.0, 0.0, 1.0]


def test_free_bits_floors_each_unit_in_the_loss():
    kl = torch.tensor([[0.1, 2.0], [0.3, 4.0]])  # (B, U): unit means 0.2 and 3.0
    assert math.isclose(float(free_bits_rate(kl, 0.0)), 3.2, rel_tol=1e-6)
    assert math.isclose(float(free_bits_rate(kl, 0.5)), 3.5, rel_tol=1e-6)


def test_free_bits_change_the_loss_but_not_the_elbo():
    model = small_vae()
    x = batch()
    torch.manual_seed(0)
    plain = model(x)
    model.config.free_bits = 5.0
    torch.manual_seed(0)
    floored = model(x)
    assert torch.equal(plain.metrics["elbo"], floored.metrics["elbo"])
    assert float(floored.loss.detach()) > float(plain.loss.detach())


def test_lr_warmup_then_cosine():
    config = OptimConfig(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.55)
    assert lr_factor(110, config) == pytest.approx(0.1)
    assert lr_factor(500, OptimConfig(warmup_steps=0, total_steps=0)) == 1.0


def params_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_step_skips_on_nan_loss_and_counts_it():
    model = small_vae()
    trainer = TrainStep(model, OptimConfig(ema_decay=0.9))
    before = params_of(model)
    bad = batch()
    bad[0, 0, 0, 0] = float("nan")
    _, stats = trainer.step(bad)
    assert stats["skipped"] and not math.isfinite(stats["grad_norm"])
    assert (trainer.steps, trainer.skipped) == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(trainer.ema)))


def test_step_skips_on_huge_grad_norm():
    model = small_vae()
    trainer = TrainStep(model, OptimConfig(skip_grad_norm=1e-6))
    before = params_of(model)
    _, stats = trainer.step(batch())
    assert stats["skipped"] and stats["grad_norm"] > 1e-6 and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_step_updates_and_ema_moves_toward_the_weights():
    model = small_vae()
    trainer = TrainStep(model, OptimConfig(lr=1e-2, ema_decay=0.75))
    trainer.updates = 100  # past the EMA warm-up, so the configured decay applies
    before = params_of(model)
    output, stats = trainer.step(batch(), kl_weight=0.5)
    assert not stats["skipped"] and math.isfinite(stats["loss"]) and stats["lr"] == pytest.approx(1e-2)
    assert math.isfinite(float(output.metrics["elbo"]))
    for old, new, ema in zip(before, params_of(model), params_of(trainer.ema)):
        assert torch.allclose(ema, 0.75 * old + 0.25 * new, atol=1e-6)


def test_ema_warms_up_from_the_first_updates():
    model = small_vae()
    trainer = TrainStep(model, OptimConfig(lr=1e-2, ema_decay=0.999))
    before = params_of(model)
    trainer.step(batch())
    for old, new, ema in zip(before, params_of(model), params_of(trainer.ema)):
        assert torch.allclose(ema, 0.1 * old + 0.9 * new, atol=1e-6)  # decay min(0.999, 1/10)
    assert not trainer.ema.training and not any(p.requires_grad for p in trainer.ema.parameters())


class Wrapped(nn.Module):
    """Stands in for DistributedDataParallel: the real model lives in `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_ema_shadows_the_unwrapped_module():
    trainer = TrainStep(Wrapped(small_vae()), OptimConfig())
    trainer.step(batch())
    assert isinstance(trainer.ema, GaussianVAE)
    assert trainer.ema(batch()).recon.shape == (8, 1, 8, 8)


def test_state_dict_round_trip_restores_counters_optimizer_and_ema():
    trainer = TrainStep(small_vae(), OptimConfig(warmup_steps=5, total_steps=50))
    for _ in range(3):
        trainer.step(batch())
    state = trainer.state_dict()
    fresh = TrainStep(small_vae(), OptimConfig(warmup_steps=5, total_steps=50))
    fresh.load_state_dict(state)
    assert (fresh.steps, fresh.skipped, fresh.updates) == (3, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip(params_of(fresh.ema), params_of(trainer.ema)))
    exp_avg = lambda t: [s["exp_avg"] for s in t.optimizer.state_dict()["state"].values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(exp_avg(fresh), exp_avg(trainer)))
    assert fresh.step(batch())[1]["lr"] == pytest.approx(1e-3 * 4 / 5)  # warm-up resumes at step 4 of 5
