"""The adversarial tokenizer task (VQGAN class): the tokenizer task plus LPIPS and a PatchGAN
discriminator with its own optimizer (`tokenmill train` with a `loss` section).

A step, on every rank in this order (`pipeline.training.step` runs each backward between yields,
every forward under the run's autocast):
  1. generator: the model's forward (DDP) and its own loss (reconstruction + quantizer);
     the perceptual (LPIPS) and adversarial (frozen discriminator, from `disc_start`) terms are
     taken on a detached copy p of the prediction, and their gradients ∂/∂p are carried back
     into the decoder by a surrogate term ⟨prediction, ∂L/∂p⟩, which has the same gradient. So
     LPIPS and the discriminator see one backward each, and taming's adaptive weight
     λ = |∇_last nll| / |∇_last gan| (at the unwrapped decoder's last layer, averaged over
     ranks) costs only the last layer's backward, twice;
  2. discriminator [step ≥ disc_start]: one DDP forward on real and detached fake images together
     (one forward per backward, as DDP needs), hinge or non-saturating loss (+ LeCAM).
LeCAM's averages are the task's state, in every checkpoint with the discriminator's weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn

from tokenmill.models.errors import UserError
from tokenmill.models.lpips import LPIPS, resolve_lpips_weights
from tokenmill.models.serialization import model_class_for_kind
from tokenmill.models.vqgan_loss import (
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_loss,
    generator_adversarial_loss,
)
from tokenmill.pipeline.runtime.weights import local_lpips_weights
from tokenmill.pipeline.shards.stream import to_model_input
from tokenmill.pipeline.training.config import VQGANLossConfig
from tokenmill.pipeline.training.optim import OptimConfig, Part
from tokenmill.pipeline.training.step import Loss
from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class AdversarialTask(TokenizerTask):
    name = "adversarial"

    # -- driver ---------------------------------------------------------------------------------------
    def prepare(self, tracking_uri: str) -> dict[str, str]:
        lpips_tags = require_loss_weights(self.config.loss, model_class_for_kind(self.config.model.kind))
        return lpips_tags | super().prepare(tracking_uri)  # the weights first: their absence is the likelier mistake

    # -- every rank -----------------------------------------------------------------------------------
    def build(self) -> dict[str, tuple[nn.Module, OptimConfig]]:
        parts = super().build()
        loss = self.config.loss
        if loss.uses_discriminator:
            discriminator = PatchDiscriminator(self.config.model.in_channels, loss.discriminator)
            parts["discriminator"] = (discriminator, dataclasses.replace(loss.disc_optim, ema_decay=0.0))
        return parts

    def setup(self, context: Any) -> None:
        super().setup(context)
        loss = self.config.loss
        self.lpips = None
        if loss.perceptual_weight > 0:
            weights = local_lpips_weights(loss.perceptual)  # this node's cached copy of a URL
            self.lpips = LPIPS.from_files(resolve_lpips_weights(weights)).to(context.device)
        self.lecam = LeCAM(loss.lecam_decay).to(context.device)

    def losses(self, batch: Any, step: int, parts: Mapping[str, Part]) -> Iterator[Loss]:
        x, _ = to_model_input(batch)  # (B, C, H, W) in [0, 1]; labels are ignored
        gan_on = "discriminator" in parts and step >= self.config.loss.disc_start  # the same on every rank
        output = parts["model"].model(x)
        surrogate, reported, terms = self._generator_loss(output, x, parts, gan_on)
        yield Loss("model", surrogate, metrics={**output.metrics, **terms}, reported=reported)
        if gan_on:
            yield self._discriminator_loss(x, output.prediction.detach(), parts["discriminator"])

    def _generator_loss(self, output: Any, x: torch.Tensor, parts: Mapping[str, Part],
                        gan_on: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(surrogate with the generator's gradient, the loss it stands for, logged terms)."""
        loss = self.config.loss
        prediction = output.prediction  # (B, C, H, W), unclamped, [0, 1] scale, with grad
        p = prediction.detach().float().requires_grad_(True)
        zero = torch.zeros((), device=x.device)
        perceptual = self.lpips(2 * x - 1, 2 * p - 1).mean() if self.lpips is not None else zero
        g_adv = zero
        if gan_on:
            g_adv = generator_adversarial_loss(parts["discriminator"].module(2 * p - 1), loss.adversarial_loss)
        with torch.autocast(x.device.type, enabled=False):  # gradients outside autocast, as the loop's
            grad_p, grad_adv = _grads_at(p, loss.perceptual_weight * perceptual, g_adv)
            weight = torch.ones((), device=x.device)
            if gan_on and loss.adaptive_weight:
                grad_pixel = torch.autograd.grad(output.loss, prediction, retain_graph=True)[0]  # recon term only
                last_layer = parts["model"].module.last_layer  # the unwrapped decoder's (under DDP too)
                weight = mean_over_ranks(_adaptive_weight(prediction, last_layer, grad_pixel + grad_p, grad_adv))
        push = grad_p + loss.adversarial_weight * weight * grad_adv  # ∂(perceptual + GAN terms)/∂prediction
        surrogate = output.loss + (prediction.float() * push).sum()
        reported = output.loss.detach() + loss.perceptual_weight * perceptual.detach() + \
            loss.adversarial_weight * weight * g_adv.detach()
        terms = {"perceptual": perceptual.detach()} if self.lpips is not None else {}
        if gan_on:
            terms |= {"g_adv": g_adv.detach(), "adaptive_weight": weight}
        return surrogate, reported, terms

    def _discriminator_loss(self, x: torch.Tensor, fake: torch.Tensor, disc: Part) -> Loss:
        """fake: the generator's detached prediction (B, C, H, W) in the [0, 1] scale."""
        loss = self.config.loss
        logits = disc.model(torch.cat([2 * x - 1, 2 * fake - 1]))  # (2B, 1, h, w): one DDP forward
        logits_real, logits_fake = logits.chunk(2)
        d_loss = discriminator_loss(logits_real, logits_fake, loss.adversarial_loss)
        terms = {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().float().mean(),
                 "logits_fake": logits_fake.detach().float().mean()}
        if loss.lecam_weight > 0:
            lecam = self.lecam(logits_real, logits_fake, mean_over_ranks)
            d_loss = d_loss + loss.lecam_weight * lecam
            terms["lecam"] = lecam.detach()
        return Loss("discriminator", d_loss, metrics=terms)

    def state_dict(self) -> dict[str, Any]:
        return {"lecam": self.lecam.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lecam" in state:
            self.lecam.load_state_dict(state["lecam"])


def _adaptive_weight(prediction: torch.Tensor, last_layer: torch.Tensor, grad_nll: torch.Tensor,
                     grad_gan: torch.Tensor) -> torch.Tensor:
    """taming's λ from the two gradients at the prediction, carried to the decoder's last layer:
    a backward through that layer alone, per gradient."""
    nll, gan = (torch.autograd.grad(prediction, last_layer, grad_outputs=g.to(prediction.dtype), retain_graph=True)[0]
                for g in (grad_nll, grad_gan))
    return adaptive_weight(nll, gan)


def _grads_at(p: torch.Tensor, perceptual: torch.Tensor, g_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∂perceptual/∂p and ∂g_adv/∂p (zeros for a term that does not depend on p): one backward each."""
    return tuple(torch.autograd.grad(term, p)[0] if term.requires_grad else torch.zeros_like(p)
                 for term in (perceptual, g_adv))


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
    found = resolve_lpips_weights(local_lpips_weights(loss.perceptual)).describe()
    return {f"tokenmill.lpips.{k}": v for k, v in found.items()}
