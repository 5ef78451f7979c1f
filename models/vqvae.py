"""VQ-VAE (van den Oord et al. 2017) and the two-level VQ-VAE-2 (Razavi et al. 2019).

Both are image tokenizers: `encode(x)` gives int64 codes, `decode(codes)` images in [0, 1], and
in eval mode `decode(encode(x))` is bit-identical to `forward(x).recon`.

Loss (per image, the scale of a summed Gaussian log-likelihood up to constants): the squared
error summed over pixels, plus the quantizer loss scaled by the same number of pixel values, so
the β/recon balance is the usual mean-based VQ-VAE objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.image_metrics import psnr
from tokenmill.models.layers import conv_decoder, conv_encoder, upsample
from tokenmill.models.quantizers import QuantizerConfig, build_quantizer, check_scales
from tokenmill.models.ranges import STRICT, Count, PositiveInt
from tokenmill.models.serialization import register_model
from tokenmill.models.tokenizer import (
    GridTokenizer,
    Tokenizer,
    VQOutput,
    code_metrics,
    num_stages,
    quantizer_config,
    to_first,
    to_last,
)


@dataclass
class _VQConfig:
    """What both VQ configs hold; each adds its `kind` (which keeps the first slot) and its
    down-sampling factors."""

    kind: str = ""
    in_channels: PositiveInt = 1
    image_size: PositiveInt = 32
    hidden: PositiveInt = 64
    res_blocks: Count = 2
    latent_dim: PositiveInt = 64
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # VQ-VAE-2: one instance per level

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        self.quantizer = quantizer_config(self.quantizer)


@dataclass
class VQVAEConfig(_VQConfig):
    kind: Literal["vqvae"] = "vqvae"
    downsample: Literal[4, 8, 16] = 4

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantizer.kind == "multiscale":  # the grid side is known here, not in the quantizer's config
            check_scales(self.quantizer.scales, self.image_size // self.downsample)


@dataclass
class VQVAE2Config(_VQConfig):
    kind: Literal["vqvae2"] = "vqvae2"
    bottom_downsample: Literal[4, 8] = 4  # image -> bottom codes
    top_downsample: Literal[2, 4] = 2  # bottom codes -> top codes

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantizer.kind == "multiscale":
            raise ValueError("quantizer kind multiscale needs one grid of codes: use it with kind vqvae or vqgan, "
                             "not vqvae2")


def _to_image(prediction: Tensor) -> Tensor:
    # Linear output clamped only for the image: a sigmoid saturates on MNIST's black background
    # and the decoder collapses to all-black; the loss sees the unclamped prediction.
    return prediction.clamp(0, 1)


def _recon_metrics(x: Tensor, prediction: Tensor, vq_loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    pixels = x[0].numel()
    loss = pixels * (F.mse_loss(prediction.float(), x.float()) + vq_loss)
    mse = F.mse_loss(_to_image(prediction.detach()).float(), x.float())
    metrics = {"mse": mse.detach(), "psnr": psnr(mse.detach()),
               "vq_loss": vq_loss.detach(), "distortion": (pixels * mse).detach()}
    return loss, metrics


@register_model
class VQVAE(GridTokenizer):
    """Codes: (B, h, w) int64 for vq/fsq, (B, h, w, stages) for rvq; h = image_size / downsample;
    multiscale: a tuple of (B, s, s) per scale, coarse to fine."""

    config_class = VQVAEConfig
    has_kl = False

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = conv_encoder(c.in_channels, c.hidden, c.latent_dim, c.downsample, c.res_blocks)
        self.quantizer = build_quantizer(c.quantizer, c.latent_dim)
        self.decoder = conv_decoder(c.latent_dim, c.hidden, c.in_channels, c.downsample, c.res_blocks)

    def forward(self, x: Tensor, y: Tensor | None = None) -> VQOutput:
        """x: (B, C, H, W) in [0, 1]; labels are ignored."""
        q = self.quantizer(to_last(self.encoder(x)))  # codes (B, h, w, D)
        prediction = self.decoder(to_first(q.codes))
        loss, metrics = _recon_metrics(x, prediction, q.loss)
        return VQOutput(loss, _to_image(prediction), metrics | code_metrics(q.indices, self.quantizer), q.indices)

    def _encode(self, x: Tensor) -> Tensor:
        return self.quantizer(to_last(self.encoder(x))).indices

    def _decode(self, codes: Tensor) -> Tensor:
        return _to_image(self.decoder(to_first(self.quantizer.indices_to_codes(codes))))


@register_model
class VQVAE2(Tokenizer):
    """Codes: a tuple (top (B, ht, wt), bottom (B, hb, wb)) int64 (a trailing stages axis for
    rvq); the bottom level is conditioned on the decoded top level, as in VQ-VAE-2."""

    config_class = VQVAE2Config
    has_kl = False

    def __init__(self, config: VQVAE2Config) -> None:
        super().__init__()
        self.config = config
        c, d = config, config.latent_dim
        self.encoder_bottom = conv_encoder(c.in_channels, c.hidden, c.hidden, c.bottom_downsample, c.res_blocks)
        self.encoder_top = conv_encoder(c.hidden, c.hidden, d, c.top_downsample, c.res_blocks)
        self.quantizer_top = build_quantizer(c.quantizer, d)
        self.decoder_top = conv_decoder(d, c.hidden, d, c.top_downsample, c.res_blocks)  # top -> bottom grid
        self.pre_bottom = nn.Conv2d(c.hidden + d, d, 1)
        # Different seed: the two levels must not draw the same restart rows.
        self.quantizer_bottom = build_quantizer(c.quantizer, d, seed_offset=1000)
        self.upsample_top = upsample(d, d, c.top_downsample)
        self.decoder = conv_decoder(2 * d, c.hidden, c.in_channels, c.bottom_downsample, c.res_blocks)

    @property
    def codebook_size(self) -> int:
        return self.quantizer_bottom.codebook_size

    @property
    def token_shape(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c = self.config
        bottom = c.image_size // c.bottom_downsample
        top = bottom // c.top_downsample
        stages = num_stages(self.quantizer_bottom)
        extra = () if stages == 1 else (stages,)
        return (top, top, *extra), (bottom, bottom, *extra)

    def _quantize(self, x: Tensor):
        h_bottom = self.encoder_bottom(x)  # (B, hidden, hb, wb)
        q_top = self.quantizer_top(to_last(self.encoder_top(h_bottom)))  # (B, ht, wt, D)
        top_on_bottom = self.decoder_top(to_first(q_top.codes))  # (B, D, hb, wb)
        q_bottom = self.quantizer_bottom(to_last(self.pre_bottom(torch.cat([h_bottom, top_on_bottom], 1))))
        return q_top, q_bottom

    def _predict(self, top: Tensor, bottom: Tensor) -> Tensor:
        """top (B, D, ht, wt), bottom (B, D, hb, wb) quantized latents -> unclamped images."""
        return self.decoder(torch.cat([bottom, self.upsample_top(top)], 1))

    def forward(self, x: Tensor, y: Tensor | None = None) -> VQOutput:
        q_top, q_bottom = self._quantize(x)
        prediction = self._predict(to_first(q_top.codes), to_first(q_bottom.codes))
        loss, metrics = _recon_metrics(x, prediction, q_top.loss + q_bottom.loss)
        metrics |= code_metrics(q_top.indices, self.quantizer_top, "/top")
        metrics |= code_metrics(q_bottom.indices, self.quantizer_bottom, "/bottom")
        metrics |= {"usage": (metrics["usage/top"] + metrics["usage/bottom"]) / 2,
                    "perplexity": metrics["perplexity/bottom"]}
        return VQOutput(loss, _to_image(prediction), metrics, (q_top.indices, q_bottom.indices))

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q_top, q_bottom = self._quantize(x)
        return q_top.indices, q_bottom.indices

    def _decode(self, codes: tuple[Tensor, Tensor]) -> Tensor:
        top, bottom = codes
        return _to_image(self._predict(
            to_first(self.quantizer_top.indices_to_codes(top)), to_first(self.quantizer_bottom.indices_to_codes(bottom))
        ))
