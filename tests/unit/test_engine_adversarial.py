"""The adversarial (VQGAN) task in this process: its forwards run under autocast, its adaptive
weight costs one backward through LPIPS and the discriminator, its gradient equals taming's
two-backward formula, and its two optimizers checkpoint and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CONFIGS
from helpers.engine import rgb_shards, run_in_process
from helpers.lpips import write_random_lpips_weights

from tokenmill.models.serialization import load_model
from tokenmill.models.vqgan_loss import generator_adversarial_loss
from tokenmill.pipeline.shards.stream import to_model_input
from tokenmill.pipeline.training.config import load_train_config
from tokenmill.pipeline.training.context import LocalContext
from tokenmill.pipeline.training.loop import build_parts
from tokenmill.pipeline.training.step import StepRunner
from tokenmill.pipeline.training.tasks.adversarial import AdversarialTask


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return rgb_shards(tmp_path_factory.mktemp("gan-shards"))


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    return write_random_lpips_weights(tmp_path_factory.mktemp("lpips"))


def gan_task(shards: str, lpips_files, root, *overrides: str) -> AdversarialTask:
    vgg, lin = lpips_files
    return AdversarialTask(load_train_config(CONFIGS / "debug_vqgan.yaml", [
        f"data.shards={shards}", f"run.root={root}", "loss.perceptual_weight=0.1", f"loss.perceptual.vgg_path={vgg}",
        f"loss.perceptual.lin_path={lin}", "loss.perceptual.verify_sha256=false", "tracking.log_images=false",
        *overrides]))


def one_rank(task: AdversarialTask, root):
    """The task set up on an in-process rank: (parts, a train batch)."""
    task.prepare("")
    context = LocalContext(root, task.inputs(in_process=True).datasets)
    task.setup(context)
    torch.manual_seed(0)
    parts = build_parts(task, context, None)
    return parts, next(context.dataset("train").iter_torch_batches(batch_size=8))


def test_bf16_runs_generator_lpips_and_discriminator_forwards_under_autocast(shards, lpips_files, tmp_path):
    task = gan_task(shards, lpips_files, tmp_path, "loss.disc_start=0", "train.precision=bf16")
    parts, batch = one_rank(task, tmp_path)
    seen: dict[str, list[bool]] = {}

    def record(name):
        return lambda *_: seen.setdefault(name, []).append(torch.is_autocast_enabled("cpu"))

    for name, module in (("generator", parts["model"].module), ("lpips", task.lpips),
                         ("discriminator", parts["discriminator"].module)):
        module.register_forward_hook(record(name))
        module.register_full_backward_hook(record(f"{name} backward"))
    parts["model"].module.last_layer.register_hook(record("generator backward"))
    StepRunner(parts, "bf16", torch.device("cpu")).run(task.losses, [batch], step=0)
    forwards = {k: v for k, v in seen.items() if "backward" not in k}
    assert forwards == {"generator": [True], "lpips": [True], "discriminator": [True, True]}, seen  # G's term, D's step
    assert all(not on for k, v in seen.items() if "backward" in k for on in v), seen
    assert {"lpips backward", "discriminator backward", "generator backward"} <= set(seen)


def test_adaptive_weight_costs_one_backward_through_lpips_and_the_discriminator(shards, lpips_files, tmp_path):
    """taming takes ∇ at the decoder's last layer of nll and of the GAN loss, then the total's
    backward goes through LPIPS and the discriminator again: LPIPS twice, the discriminator three
    times with its own update. Here the generator's loss goes through each once."""
    task = gan_task(shards, lpips_files, tmp_path, "loss.disc_start=0")
    parts, batch = one_rank(task, tmp_path)
    backwards = {"lpips": 0, "discriminator": 0}
    for name, module in (("lpips", task.lpips), ("discriminator", parts["discriminator"].module)):
        module.register_full_backward_hook(lambda *_, n=name: backwards.__setitem__(n, backwards[n] + 1))
    result = StepRunner(parts, "fp32", torch.device("cpu")).run(task.losses, [batch], step=0)
    assert backwards == {"lpips": 1, "discriminator": 2}  # the discriminator: the generator's term + its own update
    assert set(result.parts) == {"model", "discriminator"} and float(result.metrics["adaptive_weight"]) > 0


def test_generator_gradient_equals_tamings_formula(shards, lpips_files, tmp_path):
    task = gan_task(shards, lpips_files, tmp_path, "loss.disc_start=0")
    parts, batch = one_rank(task, tmp_path)
    model, disc = copy.deepcopy(parts["model"].module), copy.deepcopy(parts["discriminator"].module)
    x, _ = to_model_input(batch)  # the task's own conversion: one memory layout, so one set of float sums
    loss = task.config.loss

    torch.manual_seed(1)
    output = model.train()(x)  # the reference: taming's vqperceptual, written out
    nll = output.loss + loss.perceptual_weight * task.lpips(2 * x - 1, 2 * output.prediction - 1).mean()
    g_loss = generator_adversarial_loss(disc.requires_grad_(False)(2 * output.prediction - 1), loss.adversarial_loss)
    grads = [torch.autograd.grad(t, model.last_layer, retain_graph=True)[0] for t in (nll, g_loss)]
    weight = (grads[0].norm() / (grads[1].norm() + 1e-4)).clamp(0, 1e4).detach()
    total = nll + loss.adversarial_weight * weight * g_loss
    total.backward()

    torch.manual_seed(1)
    parts["model"].model.train()
    ours = next(task.losses(batch, 0, parts))
    ours.value.backward()
    assert float(ours.reported) == pytest.approx(float(total), rel=1e-5)
    assert float(ours.metrics["adaptive_weight"]) == pytest.approx(float(weight), rel=1e-4)
    pairs = [(a.grad, b.grad) for a, b in zip(model.parameters(), parts["model"].module.parameters())
             if a.grad is not None]
    reference, difference = (torch.cat([g.flatten() for g in grads]) for grads in
                             ([a for a, _ in pairs], [a - b for a, b in pairs]))
    assert difference.norm() <= 1e-5 * reference.norm()  # the same gradient, to float rounding


def test_both_optimizers_checkpoint_and_resume(shards, lpips_files, tmp_path):
    """6 steps with the discriminator from step 2, then a resumed run to step 9."""
    first = run_in_process(gan_task(shards, lpips_files, tmp_path, "train.steps=6"), tmp_path)
    state = first.train_state()
    disc = state["parts"]["discriminator"]
    assert disc["steps"] == 4 and disc["optimizer"]["state"] and disc["ema"] is None  # steps 2..5 of 0..5
    assert any(k.endswith("weight") for k in disc["module"])
    assert float(state["extra"]["task"]["lecam"]["ema_real"]) != 0.0

    resumed = run_in_process(gan_task(shards, lpips_files, tmp_path, "train.steps=9"), tmp_path)
    state = resumed.train_state()
    assert resumed.context.reports[-1]["resumed_from_step"] == 6
    assert (state["parts"]["discriminator"]["steps"], state["parts"]["model"]["steps"]) == (7, 9)  # 4 restored + 3
    exported = load_model(resumed.checkpoint() / "model").state_dict()
    assert not any(k.startswith(("disc", "lpips")) for k in exported)


def test_lpips_weights_are_recorded_as_run_tags(shards, lpips_files, tmp_path):
    tags = gan_task(shards, lpips_files, tmp_path).prepare("")
    assert len(tags["tokenmill.lpips.vgg_sha256"]) == 64 and len(tags["tokenmill.lpips.lin_sha256"]) == 64


def test_a_decoder_only_vqgan_fine_tune_trains_with_lpips_and_the_gan(shards, lpips_files, tmp_path):
    """train.freeze [encoder, quantizer] on the adversarial task: LPIPS, the discriminator and the
    adaptive weight at the decoder's last layer all run; only the decoder moves. Freezing the
    decoder with the adaptive weight on is refused (its gradient there is what the weight compares)."""
    from tokenmill.models.errors import UserError

    class Kept(AdversarialTask):
        def build(self):  # the run's own initial weights
            parts = super().build()
            self.initial = {k: v.clone() for k, v in parts["model"][0].state_dict().items()}
            return parts

    config = gan_task(shards, lpips_files, tmp_path / "a", "loss.disc_start=0", "train.steps=2", "train.val_every=2",
                      "train.checkpoint_every=2", "optim.ema_decay=0", "train.freeze=[encoder,quantizer]").config
    run = run_in_process(Kept(config), tmp_path / "a")
    before, after = run.task.initial, run.train_state()["parts"]["model"]["module"]
    assert run.context.reports[-1]["step"] == 2 and "discriminator" in run.train_state()["parts"]
    frozen = [k for k in after if k.startswith(("encoder.", "quantizer."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("decoder."))
    with pytest.raises(UserError, match="set loss.adaptive_weight: false"):
        gan_task(shards, lpips_files, tmp_path / "b", "train.freeze=[decoder]").prepare("")
