"""One-stochastic-layer VAEs: `GaussianVAE` (conv or MLP) and the label-conditioned `ConditionalVAE`.

Encoder: x (B, C, H, W) -> μ, log σ² (B, L); z = μ + σ ⊙ ε; decoder: z -> likelihood params.
`forward` returns nats per image: distortion = −log p(x|z), rate = KL(q(z|x) ‖ N(0, I)),
elbo = −(distortion + rate), loss = distortion + kl_weight · rate (free bits on the loss only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from tokenmill.models.gaussian import kl_standard_normal, log_normal, log_standard_normal, reparameterize
from tokenmill.models.image_metrics import bits_per_dim
from tokenmill.models.likelihoods import make_likelihood
from tokenmill.models.ranges import STRICT, NonNegative, Positive, PositiveInt
from tokenmill.models.schedules import free_bits_rate
from tokenmill.models.serialization import register_model


@dataclass
class VAEOutput:
    loss: torch.Tensor  # scalar, nats per image
    recon: torch.Tensor  # (B, C, H, W) in [0, 1]
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, nats per image


def assemble_output(
    log_px_z: torch.Tensor,
    kl_units: torch.Tensor,
    recon: torch.Tensor,
    kl_weight: float,
    free_bits: float,
    group_kl: dict[str, torch.Tensor] | None = None,
) -> VAEOutput:
    """Shared ELBO bookkeeping. log_px_z (B,), kl_units (B, U), group_kl name -> (B,)."""
    distortion = -log_px_z.mean()
    rate = kl_units.sum(1).mean()
    elbo = -(distortion + rate)
    loss = distortion + kl_weight * free_bits_rate(kl_units, free_bits)
    dims = recon[0].numel()
    metrics = {
        "elbo": elbo.detach(),
        "distortion": distortion.detach(),
        "rate": rate.detach(),
        "bits_per_dim": bits_per_dim(-elbo, dims).detach(),
    }
    for name, kl in (group_kl or {}).items():
        metrics[f"kl/{name}"] = kl.mean().detach()
    return VAEOutput(loss=loss, recon=recon, metrics=metrics)


@dataclass
class VAEConfig:
    kind: Literal["vae"] = "vae"
    arch: Literal["conv", "mlp"] = "conv"
    image_size: PositiveInt = 32  # conv: divisible by 8
    channels: PositiveInt = 1
    latent_dim: PositiveInt = 32
    hidden: PositiveInt = 64  # conv: base channels; mlp: hidden units
    likelihood: Literal["bernoulli", "gaussian", "dlogistic"] = "bernoulli"
    sigma: Positive = 0.1  # gaussian likelihood σ (initial value when learned)
    learn_sigma: bool = False
    n_mix: PositiveInt = 5  # dlogistic mixture components
    free_bits: NonNegative = 0.0  # nats per latent dim, loss only

    __pydantic_config__ = STRICT


@dataclass
class CVAEConfig(VAEConfig):
    kind: Literal["cvae"] = "cvae"  # stays the first field: dataclasses keep an overridden field's slot
    num_classes: PositiveInt = 10
    label_dim: PositiveInt = 16  # label embedding width fed to encoder and decoder

    __pydantic_config__ = STRICT


class _ConvEncoder(nn.Module):
    """(B, C, S, S) -> (B, 2h·(S/8)²) with three stride-2 convs."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        h = c.hidden
        self.net = nn.Sequential(
            nn.Conv2d(c.channels, h, 4, 2, 1), nn.GELU(),
            nn.Conv2d(h, 2 * h, 4, 2, 1), nn.GELU(),
            nn.Conv2d(2 * h, 2 * h, 4, 2, 1), nn.GELU(),
            nn.Flatten(),
        )
        self.out_features = 2 * h * (c.image_size // 8) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ConvDecoder(nn.Module):
    """(B, in) -> (B, P, S, S): a linear map to (2h, S/8, S/8) then three stride-2 transposed convs."""

    def __init__(self, c: VAEConfig, in_features: int, param_channels: int):
        super().__init__()
        h, s = c.hidden, c.image_size // 8
        self.fc = nn.Linear(in_features, 2 * h * s * s)
        self.shape = (2 * h, s, s)
        self.net = nn.Sequential(
            nn.GELU(),
            nn.ConvTranspose2d(2 * h, 2 * h, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(2 * h, h, 4, 2, 1), nn.GELU(),
            nn.ConvTranspose2d(h, param_channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, *self.shape))


class _MLPEncoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        d = c.channels * c.image_size**2
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.hidden), nn.GELU())
        self.out_features = c.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _MLPDecoder(nn.Module):
    def __init__(self, c: VAEConfig, in_features: int, param_channels: int):
        super().__init__()
        self.shape = (param_channels, c.image_size, c.image_size)
        self.net = nn.Sequential(
            nn.Linear(in_features, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.hidden), nn.GELU(),
            nn.Linear(c.hidden, param_channels * c.image_size**2),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.shape)


@register_model
class GaussianVAE(nn.Module):
    config_class = VAEConfig
    has_kl = True

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.likelihood = make_likelihood(c.likelihood, c.channels, c.sigma, c.learn_sigma, c.n_mix)
        cond = self._cond_dim()
        self.encoder = _ConvEncoder(c) if c.arch == "conv" else _MLPEncoder(c)
        self.to_posterior = nn.Linear(self.encoder.out_features + cond, 2 * c.latent_dim)
        decoder_cls = _ConvDecoder if c.arch == "conv" else _MLPDecoder
        self.decoder = decoder_cls(c, c.latent_dim + cond, self.likelihood.param_channels)

    # Conditioning hooks; the unconditional VAE ignores labels.
    def _cond_dim(self) -> int:
        return 0

    def _condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None

    @staticmethod
    def _join(h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return h if cond is None else torch.cat([h, cond], dim=1)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> posterior μ, log σ² (B, L)."""
        h = self.encoder(x * 2.0 - 1.0)  # centred inputs train faster
        mu, logvar = self.to_posterior(self._join(h, self._condition(y))).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)  # keeps exp(logvar) finite early in training

    def decode_params(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, L) -> likelihood params (B, P, H, W)."""
        return self.decoder(self._join(z, self._condition(y)))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, L) -> mean image (B, C, H, W) in [0, 1]."""
        return self.likelihood.mean(self.decode_params(z, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, kl_weight: float = 1.0) -> VAEOutput:
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar)
        params = self.decode_params(z, y)
        kl_units = kl_standard_normal(mu, logvar)  # (B, L)
        return assemble_output(
            self.likelihood.log_prob(params, x), kl_units, self.likelihood.mean(params),
            kl_weight, self.config.free_bits,
        )

    def log_terms(
        self, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k posterior samples per image -> log p(x|z), log p(z), log q(z|x), each (k, B)."""
        b = x.shape[0]
        mu, logvar = self.encode(x, y)  # encoded once, shared by the k samples
        mu_k, logvar_k = mu.repeat(k, 1), logvar.repeat(k, 1)  # (k·B, L), sample-major
        z = reparameterize(mu_k, logvar_k)
        y_k = None if y is None else y.repeat(k)
        log_px_z = self.likelihood.log_prob(self.decode_params(z, y_k), x.repeat(k, 1, 1, 1))
        log_pz = log_standard_normal(z).sum(1)
        log_qz = log_normal(z, mu_k, logvar_k).sum(1)
        return log_px_z.view(k, b), log_pz.view(k, b), log_qz.view(k, b)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n images (n, C, H, W) from the prior; temperature scales σ (0 gives the prior mean)."""
        device = self.to_posterior.weight.device
        z = reparameterize(torch.zeros(n, self.config.latent_dim, device=device),
                           torch.zeros(n, self.config.latent_dim, device=device), temperature)
        return self.decode(z, y)


@register_model
class ConditionalVAE(GaussianVAE):
    """Encoder and decoder both see a label embedding; sampling takes labels (n,)."""

    config_class = CVAEConfig

    def __init__(self, config: CVAEConfig):
        self._label_dim = config.label_dim
        super().__init__(config)
        self.label_embedding = nn.Embedding(config.num_classes, config.label_dim)

    def _cond_dim(self) -> int:
        return self._label_dim

    def _condition(self, y: torch.Tensor | None) -> torch.Tensor:
        if y is None or y.dim() != 1:
            raise ValueError("ConditionalVAE needs int64 labels y of shape (B,)")
        if (y < 0).any() or (y >= self.config.num_classes).any():
            raise ValueError(f"labels must lie in [0, {self.config.num_classes}); unlabeled data cannot train a CVAE")
        return self.label_embedding(y)

    @torch.no_grad()
    def sample(self, n: int | None = None, y: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """One image per label: y (n,) int64 -> (n, C, H, W)."""
        if y is None or y.dim() != 1 or (n is not None and n != y.shape[0]):
            raise ValueError("ConditionalVAE.sample needs labels y of shape (n,)")
        return super().sample(y.shape[0], y, temperature)
