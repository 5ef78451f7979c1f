"""The VQGAN loss pieces (taming-transformers `vqperceptual.py`, without its legacy flags):
perceptual (LPIPS) weight, PatchGAN discriminator, hinge / non-saturating GAN losses, taming's
adaptive weight, the discriminator start step and LeCAM regularisation (Tseng et al. 2021).

Single-device and rank-agnostic: the training engine's adversarial task
(`pipeline.training.tasks.adversarial`) owns the `loss` config, the two optimizers and the order
of the generator and discriminator steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.ranges import STRICT, PositiveInt


@dataclass
class DiscriminatorConfig:
    channels: PositiveInt = 64  # first layer's width, doubled per layer up to 8x
    layers: PositiveInt = 3  # stride-2 layers: 3 gives 70x70 patches on 256 px images (pix2pix)
    norm: Literal["batch", "group"] = "group"  # group: no batch statistics, identical on every rank

    __pydantic_config__ = STRICT


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: (B, C, H, W) in [-1, 1] -> (B, 1, h, w) logits, one per patch."""

    def __init__(self, in_channels: int, config: DiscriminatorConfig) -> None:
        super().__init__()
        c = config.channels

        def norm(n: int) -> nn.Module:
            return nn.BatchNorm2d(n) if config.norm == "batch" else nn.GroupNorm(min(32, n), n)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = c
        for i in range(1, config.layers + 1):
            out = c * min(2**i, 8)
            stride = 2 if i < config.layers else 1
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():  # taming's init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def generator_adversarial_loss(logits_fake: Tensor, kind: str) -> Tensor:
    """What the generator minimises: hinge -> -E[D(fake)]; non-saturating -> softplus(-D(fake))."""
    if kind == "hinge":
        return -logits_fake.float().mean()
    return F.softplus(-logits_fake.float()).mean()


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str) -> Tensor:
    """Hinge: ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]); non-saturating: ½(E[softplus(−D(x))] + E[softplus(D(x̂))])."""
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def adaptive_weight(nll_grad: Tensor, gan_grad: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming's λ = |∇_last nll| / (|∇_last gan| + 1e-4), clamped to [0, max_weight] and detached,
    from the two losses' gradients at the decoder's last layer (`last_layer`)."""
    weight = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(gan_grad.float()) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class LeCAM(nn.Module):
    """LeCAM: EMAs of the discriminator's mean output on real and fake images anchor a penalty
    E[relu(D(x) − ema_fake)²] + E[relu(ema_real − D(x̂))²] that keeps its outputs from drifting apart.
    The EMAs are buffers: they live in the discriminator's checkpoint."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: Tensor, logits_fake: Tensor, mean_over_ranks=lambda t: t) -> Tensor:
        """`mean_over_ranks` (identity when not distributed) keeps the EMAs equal on every rank."""
        real, fake = logits_real.float(), logits_fake.float()
        with torch.no_grad():
            means = mean_over_ranks(torch.stack([real.mean(), fake.mean()]))
            self.ema_real.lerp_(means[0], 1 - self.decay)
            self.ema_fake.lerp_(means[1], 1 - self.decay)
        return F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()
