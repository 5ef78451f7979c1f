"""The two-optimizer VQGAN step: the tokenizer (generator) and a PatchGAN discriminator.

`build_train_step` gives the plain `TrainStep` when the config has no `loss` section, else an
`AdversarialStep` with the same interface (`step`, `skipped`, `eval_model`, `state_dict`), so
the training loop, checkpoints and resume treat both alike. Per step, on every rank in this order:
  1. generator: forward (DDP), loss = model loss (recon + quantizer) + w_p·LPIPS
     + [step ≥ disc_start] w_adv·λ·G-loss, where λ is taming's adaptive weight from the gradient
     norms at the *unwrapped* decoder's last layer (averaged over ranks), and the discriminator is
     called unwrapped with frozen weights, so its DDP hooks never fire here;
  2. discriminator [step ≥ disc_start]: one DDP forward on real and detached fake images together
     (one forward per backward, as DDP needs), hinge or non-saturating loss (+ LeCAM).
Both updates clip and skip on a NaN/inf gradient norm (`TrainStep.apply`). The discriminator, its
optimizer state and the LeCAM averages travel in the trainer state, so a checkpoint resumes both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from models.errors import UserError
from models.lpips import LPIPS, resolve_lpips_weights
from models.training import OptimConfig, TrainStep
from models.vqgan_loss import (
    LeCAM,
    PatchDiscriminator,
    VQGANLossConfig,
    adaptive_weight,
    discriminator_loss,
    generator_adversarial_loss,
)


def build_train_step(model: nn.Module, optim: OptimConfig, loss: VQGANLossConfig | None,
                     wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                     precision: str = "fp32") -> TrainStep | "AdversarialStep":
    """`model` may be DDP-wrapped; `wrap` puts the discriminator on the device (and in DDP).
    `precision` (bf16/fp16 autocast of the forward) applies to the one-optimizer step; the
    adversarial step runs in fp32."""
    return TrainStep(model, optim, precision) if loss is None else AdversarialStep(model, optim, loss, wrap)


def require_loss_weights(loss: VQGANLossConfig | None, model_class: type) -> dict[str, str]:
    """Driver check before any work: the LPIPS files exist (else one UserError saying which file
    goes where) and the model has a decoder last layer for the adaptive weight. Returns the
    weights' paths and sha256 for the run's tags."""
    if loss is None:
        return {}
    if loss.uses_discriminator and loss.adaptive_weight and not hasattr(model_class, "last_layer"):
        raise UserError(f"loss.adaptive_weight needs a model with a decoder `last_layer` (kind: vqgan), "
                        f"not {model_class.__name__}; set loss.adaptive_weight: false")
    if loss.perceptual_weight <= 0:
        return {}
    found = resolve_lpips_weights(loss.perceptual).describe()
    return {f"tokenmill.lpips.{k}": v for k, v in found.items()}


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class AdversarialStep:
    def __init__(self, model: nn.Module, optim: OptimConfig, loss: VQGANLossConfig,
                 wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.generator = TrainStep(model, optim)
        self.module = self.generator.module  # unwrapped tokenizer
        self.loss = loss
        device = next(self.module.parameters()).device
        self.lpips = None
        if loss.perceptual_weight > 0:
            self.lpips = LPIPS.from_files(resolve_lpips_weights(loss.perceptual)).to(device)
        self.disc_module: nn.Module | None = None
        self.disc: TrainStep | None = None
        if loss.uses_discriminator:
            self.disc_module = PatchDiscriminator(self.module.config.in_channels, loss.discriminator).to(device)
            self.disc = TrainStep(wrap(self.disc_module), dataclasses.replace(loss.disc_optim, ema_decay=0.0))
        self.lecam = LeCAM(loss.lecam_decay).to(device)

    # --- the TrainStep interface the loop and the checkpoint code use ---
    @property
    def steps(self) -> int:
        return self.generator.steps

    @property
    def skipped(self) -> int:
        return self.generator.skipped

    def eval_model(self) -> nn.Module:
        return self.generator.eval_model()

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None, **forward_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """x: (B, C, H, W) in [0, 1]. Returns (model output with the loss terms in its metrics, generator stats)."""
        gan_on = self.disc is not None and self.generator.steps >= self.loss.disc_start  # same on every rank
        lr = self.generator.start_step()
        output = self.generator.model(x, y, **forward_kwargs)
        total, terms = self._generator_loss(output, x, gan_on)
        stats = self.generator.apply(total, lr)
        if gan_on:
            terms |= self._discriminator_step(x, output.prediction.detach())
        output.metrics = {**output.metrics, **terms}
        return output, stats

    def _generator_loss(self, output: Any, x: torch.Tensor, gan_on: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        nll = output.loss  # recon + quantizer loss; only recon reaches the decoder's last layer
        terms: dict[str, Any] = {}
        if self.lpips is not None:
            perceptual = self.lpips(2 * x - 1, 2 * output.prediction - 1).mean()  # (B,) -> scalar
            nll = nll + self.loss.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        if not gan_on:
            return nll, terms
        self.disc_module.requires_grad_(False)  # gradients reach the generator only
        try:
            g_loss = generator_adversarial_loss(self.disc_module(2 * output.prediction - 1), self.loss.adversarial_loss)
        finally:
            self.disc_module.requires_grad_(True)
        weight = torch.ones((), device=x.device)
        if self.loss.adaptive_weight:
            weight = mean_over_ranks(adaptive_weight(nll, g_loss, self.module.last_layer))
        terms |= {"g_adv": g_loss.detach(), "adaptive_weight": weight}
        return nll + self.loss.adversarial_weight * weight * g_loss, terms

    def _discriminator_step(self, x: torch.Tensor, fake: torch.Tensor) -> dict[str, Any]:
        """fake: the generator's detached prediction (B, C, H, W) in the [0, 1] scale."""
        lr = self.disc.start_step()
        logits = self.disc.model(torch.cat([2 * x - 1, 2 * fake - 1]))  # (2B, 1, h, w): one DDP forward
        logits_real, logits_fake = logits.chunk(2)
        d_loss = discriminator_loss(logits_real, logits_fake, self.loss.adversarial_loss)
        terms = {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().float().mean(),
                 "logits_fake": logits_fake.detach().float().mean()}
        if self.loss.lecam_weight > 0:
            lecam = self.lecam(logits_real, logits_fake, mean_over_ranks)
            d_loss = d_loss + self.loss.lecam_weight * lecam
            terms["lecam"] = lecam.detach()
        stats = self.disc.apply(d_loss, lr)
        return terms | {"disc_grad_norm": stats["grad_norm"], "disc_skipped_updates": self.disc.skipped}

    def state_dict(self) -> dict[str, Any]:
        state = self.generator.state_dict()
        if self.disc is not None:
            state["discriminator"] = {"model": self.disc_module.state_dict(), "lecam": self.lecam.state_dict(),
                                      **self.disc.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state)
        saved = state.get("discriminator")
        if self.disc is not None and saved is not None:  # a run that adds the GAN later starts it fresh
            self.disc_module.load_state_dict(saved["model"])
            self.lecam.load_state_dict(saved["lecam"])
            self.disc.load_state_dict(saved)
