"""VQGAN-class tokenizer (Esser et al. 2021, taming-transformers; LlamaGen's VQ-16): a ResNet
encoder/decoder with GroupNorm + SiLU, channel multipliers per resolution and self-attention at
the lowest resolution, around any quantizer of `models.quantizers`. `blocks: magvit2` swaps in
Open-MAGVIT2's encoder/decoder (no attention, adaptive GroupNorm on the codes in the decoder).

Images are (B, C, H, W) in [0, 1] at the interface and [-1, 1] inside (taming's range).
`forward` returns the reconstruction loss (L1 or L2, mean over pixels) plus the quantizer's
loss; the perceptual and adversarial terms are added by the training step
(`pipeline.training.tasks.adversarial`), which also reads `last_layer` for taming's adaptive weight.
The exported model is the tokenizer alone: no discriminator, no LPIPS network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.quantizers import QuantizerConfig, build_quantizer, check_scales
from tokenmill.models.ranges import STRICT, Count, PositiveInt
from tokenmill.models.serialization import register_model
from tokenmill.models.tokenizer import GridTokenizer, VQOutput, code_metrics, quantizer_config, to_first, to_last


@dataclass
class VQGANConfig:
    kind: Literal["vqgan"] = "vqgan"
    in_channels: PositiveInt = 3
    image_size: PositiveInt = 64
    base_channels: PositiveInt = 64  # width at full resolution; level i has base_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one entry per resolution: downsample = 2**(len - 1)
    res_blocks: Count = 2  # per resolution (decoder: one more, as in taming)
    attention: bool = True  # self-attention at the lowest resolution (and in the middle block)
    latent_dim: PositiveInt = 64  # quantizer input dim (taming's embed_dim)
    # Encoder output / decoder input width (taming's z_channels); >0 adds taming's 1x1 `quant_conv`
    # (z_channels -> latent_dim) and `post_quant_conv` (latent_dim -> z_channels); 0: the encoder ends at latent_dim.
    z_channels: Count = 0
    asymmetric_downsample: bool = False  # taming/LlamaGen: pad right and bottom by 1, stride-2 conv without padding
    # "magvit2": Open-MAGVIT2's improved_model.py blocks (bias-free ResBlocks, res_blocks middle blocks, no
    # attention, 1x1 encoder output, adaptive GroupNorm on the quantized latent, depth-to-space upsampling)
    blocks: Literal["taming", "magvit2"] = "taming"
    recon_loss: Literal["l1", "l2"] = "l1"
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.quantizer = quantizer_config(self.quantizer)
        if not 1 <= len(self.channel_mult) <= 5:
            raise ValueError(f"channel_mult needs 1 to 5 entries (downsample 1 to 16), got {self.channel_mult}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the downsample factor {self.downsample}")
        if self.quantizer.kind == "multiscale":  # the grid side is known here, not in the quantizer's config
            check_scales(self.quantizer.scales, self.image_size // self.downsample)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, hw, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class AsymmetricDownsample(nn.Conv2d):
    """taming's Downsample: zero-pad right and bottom by one, then a 3x3 stride-2 conv without
    padding (a plain Conv2d subclass, so its weights keep the Sequential's key layout)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def _downsample(channels: int, asymmetric: bool) -> nn.Module:
    """Halve H, W."""
    return AsymmetricDownsample(channels) if asymmetric else nn.Conv2d(channels, channels, 3, stride=2, padding=1)


def _level(in_channels: int, out_channels: int, blocks: int, attention: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers.append(ResBlock(in_channels if i == 0 else out_channels, out_channels))
        if attention:
            layers.append(AttnBlock(out_channels))
    return layers


def _middle(channels: int, attention: bool) -> list[nn.Module]:
    return [ResBlock(channels, channels), *([AttnBlock(channels)] if attention else []), ResBlock(channels, channels)]


class Encoder(nn.Sequential):
    """(B, in, H, W) -> (B, z_channels or latent_dim, H/f, W/f), f = 2**(len(channel_mult) - 1)."""

    def __init__(self, c: VQGANConfig) -> None:
        widths = [c.base_channels * m for m in c.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)]
        width = c.base_channels
        for i, out in enumerate(widths):
            lowest = i == len(widths) - 1
            layers += _level(width, out, c.res_blocks, c.attention and lowest)
            width = out
            if not lowest:
                layers.append(_downsample(width, c.asymmetric_downsample))
        out = c.z_channels or c.latent_dim
        layers += [*_middle(width, c.attention), _norm(width), nn.SiLU(), nn.Conv2d(width, out, 3, padding=1)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """(B, z_channels or latent_dim, h, w) -> (B, in, h*f, w*f); the last module is the output conv."""

    def __init__(self, c: VQGANConfig) -> None:
        widths = [c.base_channels * m for m in reversed(c.channel_mult)]
        width = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(c.z_channels or c.latent_dim, width, 3, padding=1),
                                   *_middle(width, c.attention)]
        for i, out in enumerate(widths):
            layers += _level(width, out, c.res_blocks + 1, c.attention and i == 0)
            width = out
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        layers += [_norm(width), nn.SiLU(), nn.Conv2d(width, c.in_channels, 3, padding=1)]
        super().__init__(*layers)


class AdaptiveGroupNorm(nn.Module):
    """Open-MAGVIT2's adaptive GroupNorm: an affine-free GroupNorm of x, scaled and shifted per channel
    by linear maps of the quantized latent's per-channel std and mean over positions."""

    def __init__(self, z_channels: int, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(32, channels), channels, eps=1e-6, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        """x: (B, C, H, W); style: the decoder's input (B, z, h, w)."""
        flat = style.flatten(2)  # (B, z, hw)
        scale = self.gamma((flat.var(dim=-1) + 1e-6).sqrt())  # torch.var's unbiased default, as the reference
        shift = self.beta(flat.mean(dim=-1))
        return scale[..., None, None] * self.norm(x) + shift[..., None, None]


class DepthToSpaceUpsample(nn.Conv2d):
    """Open-MAGVIT2's Upsampler: a 3x3 conv to 4x the channels, then depth-to-space in DCR order
    (the 2x2 offset is the channel's *outer* index; pixel_shuffle's is the inner one)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)  # (B, 4C, H, W)
        b, c4, h, w = out.shape
        out = out.view(b, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2)  # (B, C, H, 2, W, 2)
        return out.reshape(b, c4 // 4, 2 * h, 2 * w)


def _plain_level(in_channels: int, out_channels: int, blocks: int) -> list[nn.Module]:
    return [ResBlock(in_channels if i == 0 else out_channels, out_channels, bias=False) for i in range(blocks)]


class Magvit2Encoder(nn.Sequential):
    """Open-MAGVIT2's Encoder: (B, in, H, W) -> (B, latent_dim, H/f, W/f)."""

    def __init__(self, c: VQGANConfig) -> None:
        widths = [c.base_channels * m for m in c.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1, bias=False)]
        width = c.base_channels
        for i, out in enumerate(widths):
            layers += _plain_level(width, out, c.res_blocks)
            width = out
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [*_plain_level(width, width, c.res_blocks), _norm(width), nn.SiLU(),
                   nn.Conv2d(width, c.z_channels or c.latent_dim, 1)]
        super().__init__(*layers)


class Magvit2Decoder(nn.Sequential):
    """Open-MAGVIT2's Decoder: (B, z, h, w) -> (B, in, h*f, w*f); each level starts with an adaptive
    GroupNorm conditioned on the decoder's input. The last module is the output conv."""

    def __init__(self, c: VQGANConfig) -> None:
        z = c.z_channels or c.latent_dim
        widths = [c.base_channels * m for m in reversed(c.channel_mult)]
        width = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(z, width, 3, padding=1), *_plain_level(width, width, c.res_blocks)]
        for i, out in enumerate(widths):
            layers += [AdaptiveGroupNorm(z, width), *_plain_level(width, out, c.res_blocks)]
            width = out
            if i < len(widths) - 1:
                layers.append(DepthToSpaceUpsample(width))
        layers += [_norm(width), nn.SiLU(), nn.Conv2d(width, c.in_channels, 3, padding=1)]
        super().__init__(*layers)

    def forward(self, z: Tensor) -> Tensor:
        x = z
        for layer in self:
            x = layer(x, z) if isinstance(layer, AdaptiveGroupNorm) else layer(x)
        return x


@register_model
class VQGAN(GridTokenizer):
    """Codes: (B, h, w) int64 ((B, h, w, stages) for rvq; a tuple of (B, s, s) per scale, coarse to
    fine, for multiscale); h = image_size / downsample."""

    config_class = VQGANConfig
    has_kl = False

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        magvit2 = config.blocks == "magvit2"
        self.encoder = Magvit2Encoder(config) if magvit2 else Encoder(config)
        # Identity (no weights) unless z_channels is set, so models saved before keep their keys.
        z, d = config.z_channels, config.latent_dim
        self.quant_conv = nn.Conv2d(z, d, 1) if z else nn.Identity()
        self.quantizer = build_quantizer(config.quantizer, config.latent_dim)
        self.post_quant_conv = nn.Conv2d(d, z, 1) if z else nn.Identity()
        self.decoder = Magvit2Decoder(config) if magvit2 else Decoder(config)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight: where taming's adaptive GAN weight compares gradients."""
        return self.decoder[-1].weight

    def forward(self, x: Tensor, y: Tensor | None = None) -> VQOutput:
        """x: (B, C, H, W) in [0, 1]; labels are ignored. `prediction` is the unclamped output in [0, 1] scale."""
        q = self.quantizer(self._latents(x))  # codes (B, h, w, D)
        prediction = self._predict(q.codes)
        distance = F.l1_loss if self.config.recon_loss == "l1" else F.mse_loss
        recon_loss = distance(prediction.float(), x.float())
        mse = F.mse_loss(prediction.detach().clamp(0, 1).float(), x.float())
        metrics = {"recon_loss": recon_loss.detach(), "vq_loss": q.loss.detach(), "mse": mse,
                   "psnr": -10 * torch.log10(mse.clamp(min=1e-10))} | code_metrics(q.indices, self.quantizer)
        return VQOutput(recon_loss + q.loss, prediction.clamp(0, 1), metrics, q.indices, prediction)

    def _latents(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> quantizer inputs (B, h, w, D)."""
        return to_last(self.quant_conv(self.encoder(2 * x - 1)))

    def _predict(self, codes: Tensor) -> Tensor:
        """Quantized latents (B, h, w, D) -> unclamped images in the [0, 1] scale."""
        return (self.decoder(self.post_quant_conv(to_first(codes))) + 1) / 2

    def _encode(self, x: Tensor) -> Tensor:
        return self.quantizer(self._latents(x)).indices

    def _decode(self, codes: Tensor) -> Tensor:
        return self._predict(self.quantizer.indices_to_codes(codes)).clamp(0, 1)

