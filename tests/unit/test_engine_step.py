"""The engine's optimizer step: a Part (AdamW, LR schedule, clipping, skip-on-NaN, EMA), the
StepRunner (micro-batches, autocast around the forward only, one GradScaler) and precision."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.models.schedules import KLSchedule, free_bits_rate
from tokenmill.models.vae import GaussianVAE, VAEConfig
from tokenmill.pipeline.training.optim import OptimConfig, Part, lr_factor
from tokenmill.pipeline.training.precision import configure_device_math, resolve_precision
from tokenmill.pipeline.training.step import StepRunner, own_loss


def small_vae() -> GaussianVAE:
    torch.manual_seed(0)
    return GaussianVAE(VAEConfig(arch="mlp", image_size=8, hidden=16, latent_dim=4))


def batch() -> torch.Tensor:
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)).round()


def runner(model: torch.nn.Module, precision: str = "fp32", **optim) -> StepRunner:
    return StepRunner({"model": Part("model", model, model, OptimConfig(**optim))}, precision, torch.device("cpu"))


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


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


def test_step_skips_on_nan_loss_and_counts_it():
    model = small_vae()
    step = runner(model, ema_decay=0.9)
    before = params_of(model)
    bad = batch()
    bad[0, 0, 0, 0] = float("nan")
    result = step.run(own_loss, [(bad,)], 0)
    part = step.parts["model"]
    assert result.parts["model"]["skipped"] and not math.isfinite(result.parts["model"]["grad_norm"])
    assert (part.steps, part.skipped, part.updates) == (1, 1, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(part.ema)))


def test_a_skipped_step_leaves_adams_moments_and_step_count_alone():
    """The skip is decided on the device (fused AdamW's found_inf): after a NaN step, a good step
    gives exactly the weights of a run that never saw the bad batch."""
    bad = batch()
    bad[0, 0, 0, 0] = float("nan")
    skipping, clean = runner(small_vae(), ema_decay=0.9), runner(small_vae(), ema_decay=0.9)
    assert skipping.run(own_loss, [(bad,)], 0).parts["model"]["skipped"]
    torch.manual_seed(5)  # the same posterior samples in both good steps
    assert not skipping.run(own_loss, [(batch(),)], 1).parts["model"]["skipped"]
    torch.manual_seed(5)
    clean.run(own_loss, [(batch(),)], 0)
    for name in ("module", "ema"):
        a, b = (getattr(r.parts["model"], name) for r in (skipping, clean))
        assert all(torch.equal(x, y) for x, y in zip(params_of(a), params_of(b))), name
    steps = [s["step"] for s in skipping.parts["model"].optimizer.state_dict()["state"].values()]
    assert all(float(step) == 1 for step in steps)


def test_step_skips_on_huge_grad_norm():
    model = small_vae()
    step = runner(model, skip_grad_norm=1e-6)
    before = params_of(model)
    result = step.run(own_loss, [(batch(),)], 0)
    assert result.parts["model"]["skipped"] and result.parts["model"]["grad_norm"] > 1e-6
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_step_updates_and_ema_moves_toward_the_weights():
    model = small_vae()
    step = runner(model, lr=1e-2, ema_decay=0.75)
    step.parts["model"].updates = 100  # past the EMA warm-up, so the configured decay applies
    before = params_of(model)
    result = step.run(lambda b, s, p: own_loss((b, None, 0.5), s, p), [batch()], 0)  # kl_weight 0.5
    assert not result.parts["model"]["skipped"] and result.parts["model"]["lr"] == pytest.approx(1e-2)
    assert math.isfinite(float(result.losses["model"])) and math.isfinite(float(result.metrics["elbo"]))
    for old, new, ema in zip(before, params_of(model), params_of(step.parts["model"].ema)):
        assert torch.allclose(ema, 0.75 * old + 0.25 * new, atol=1e-6)


def test_ema_warms_up_from_the_first_updates():
    model = small_vae()
    step = runner(model, lr=1e-2, ema_decay=0.999)
    before = params_of(model)
    step.run(own_loss, [(batch(),)], 0)
    ema = step.parts["model"].ema
    for old, new, shadow in zip(before, params_of(model), params_of(ema)):
        assert torch.allclose(shadow, 0.1 * old + 0.9 * new, atol=1e-6)  # decay min(0.999, 1/10)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert step.parts["model"].eval_module() is ema


def test_part_state_round_trip_restores_counters_optimizer_and_ema():
    make = lambda: runner(small_vae(), warmup_steps=5, total_steps=50)  # noqa: E731
    trained = make()
    for i in range(3):
        trained.run(own_loss, [(batch(),)], i)
    fresh = make()
    fresh.parts["model"].load_state_dict(trained.parts["model"].state_dict())
    a, b = fresh.parts["model"], trained.parts["model"]
    assert (a.steps, a.skipped, a.updates) == (3, 0, 3)
    assert all(torch.equal(x, y) for x, y in zip(params_of(a.ema), params_of(b.ema)))
    exp_avg = lambda part: [s["exp_avg"] for s in part.optimizer.state_dict()["state"].values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(exp_avg(a), exp_avg(b)))
    assert fresh.run(own_loss, [(batch(),)], 3).parts["model"]["lr"] == pytest.approx(1e-3 * 4 / 5)  # warm-up step 4 of 5


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_twice_as_large():
    """A deterministic model (an MLP VAE's decoder on fixed latents would do; a plain linear
    regression is clearer): 2 micro-batches of 4 = 1 batch of 8, to float rounding."""
    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 1)

        def forward(self, x, y):
            return type("Out", (), {"loss": (self.linear(x).squeeze(1) - y).pow(2).mean(), "metrics": {}})()

    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), torch.randn(8)
    models, losses = [], []
    for micro in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.manual_seed(0)
        models.append(Regression())
        losses.append(float(runner(models[-1], grad_clip=0, ema_decay=0).run(own_loss, micro, 0).losses["model"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the logged loss is the mean over micro-batches
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(params_of(models[0]), params_of(models[1])))


def test_bf16_runs_the_forward_under_autocast_and_backward_and_update_outside():
    model = small_vae()
    seen: dict[str, list[bool]] = {"forward": [], "backward": [], "update": []}
    model.register_forward_hook(lambda *_: seen["forward"].append(torch.is_autocast_enabled("cpu")))
    next(model.parameters()).register_hook(lambda g: seen["backward"].append(torch.is_autocast_enabled("cpu")))
    step = runner(model, "bf16")
    step.parts["model"].optimizer.register_step_pre_hook(
        lambda *_: seen["update"].append(torch.is_autocast_enabled("cpu")))
    step.run(own_loss, [(batch(),)], 0)
    assert seen == {"forward": [True], "backward": [False], "update": [False]}


def test_fp16_scales_the_loss_and_keeps_the_scale_across_a_resume():
    """The GradScaler starts at 2^16: the first steps overflow and are skipped while the scale
    comes down, then the updates go through; its scale is part of the saved state."""
    model = small_vae()
    step = runner(model, "fp16")
    assert step.scaler is not None and runner(small_vae(), "bf16").scaler is None
    skipped = [step.run(own_loss, [(batch(),)], i).parts["model"]["skipped"] for i in range(12)]
    assert skipped[0] and not skipped[-1] and step.scaler.get_scale() < 2.0**16
    fresh = runner(small_vae(), "fp16")
    fresh.load_state_dict(step.state_dict())
    assert fresh.scaler.get_scale() == step.scaler.get_scale()


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_the_cpu(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16" and resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere: fp16 + GradScaler
    assert resolve_precision("auto", cuda) == "fp16" and resolve_precision("fp32", cuda) == "fp32"


def test_tf32_is_set_for_cuda_devices_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        configure_device_math(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        configure_device_math(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
