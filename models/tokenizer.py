"""What the VQ-family tokenizers share (VQ-VAE, VQ-VAE-2, VQGAN): the forward output, the
no-grad `encode`/`decode` entry points with collectives injection, one quantizer over one grid of
codes, the channel-layout helpers around a quantizer, and the code-usage metrics of a batch.

A quantizer sees channels last: `to_last` (B, D, h, w) -> (B, h, w, D) before it, `to_first`
back for the decoder. Subclasses implement `_encode` and `_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenmill.models.code_usage import code_counts, usage_and_perplexity
from tokenmill.models.quantizers import Collectives, QuantizerConfig, set_collectives


def quantizer_config(value: QuantizerConfig | dict) -> QuantizerConfig:
    """A model config's nested quantizer config (`load_model` / `build_model` pass it as a dict)."""
    return QuantizerConfig(**value) if isinstance(value, dict) else value


@dataclass
class VQOutput:
    loss: Tensor  # scalar, per image
    recon: Tensor  # (B, C, H, W) in [0, 1]
    metrics: dict[str, Tensor]
    indices: Tensor | tuple[Tensor, ...]  # encode()'s codes (a tuple: one per level or scale)
    prediction: Tensor | None = None  # VQGAN: the unclamped output (with grad) the GAN/perceptual terms see


def to_last(z: Tensor) -> Tensor:  # (B, D, h, w) -> (B, h, w, D)
    return z.permute(0, 2, 3, 1)


def to_first(z: Tensor) -> Tensor:  # (B, h, w, D) -> (B, D, h, w)
    # Contiguous: conv kernels pick algorithms by memory layout, and recon must match decode bit for bit.
    return z.permute(0, 3, 1, 2).contiguous()


def num_stages(quantizer: nn.Module) -> int:
    """Codes per position: a residual quantizer's stages, else 1."""
    return getattr(quantizer, "num_stages", 1)


def code_scales(model: nn.Module) -> tuple[int, ...] | None:
    """The sides of a multi-scale quantizer's token maps (its levels, coarse to fine), else None."""
    return getattr(getattr(model, "quantizer", None), "scales", None)


def counted_levels(model: nn.Module, indices: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The code arrays whose usage is counted apart: one per level, except that a multi-scale
    quantizer's scales share one codebook and count as one (every scale's codes, flattened)."""
    levels = tuple(indices) if isinstance(indices, (tuple, list)) else (indices,)
    if code_scales(model):
        return (torch.cat([level.reshape(-1) for level in levels]),)
    return levels


def code_metrics(indices: Tensor | tuple[Tensor, ...], quantizer: nn.Module, suffix: str = "") -> dict[str, Tensor]:
    """This batch's codebook usage and perplexity (`usage<suffix>`, `perplexity<suffix>`); a
    tuple of code maps (a multi-scale quantizer's scales) counts over their one shared codebook."""
    if isinstance(indices, (tuple, list)):
        indices = torch.cat([level.reshape(-1) for level in indices])
    usage, perplexity = usage_and_perplexity(code_counts(indices, quantizer.codebook_size, num_stages(quantizer)))
    return {f"usage{suffix}": usage.float(), f"perplexity{suffix}": perplexity.float()}


class Tokenizer(nn.Module):
    """What every VQ-family model shares: collectives injection and the no-grad tokenizer entry points."""

    def set_collectives(self, collectives: Collectives) -> None:
        """Called by the training loop after wrapping DDP; reaches every quantizer of the model."""
        set_collectives(self, collectives)

    @torch.no_grad()
    def encode(self, x: Tensor):
        return self._encode(x)

    @torch.no_grad()
    def decode(self, codes) -> Tensor:
        return self._decode(codes)


class GridTokenizer(Tokenizer):
    """One quantizer (`self.quantizer`) over one grid of codes: (side, side), or (side, side,
    stages) for rvq, with side = config.image_size / config.downsample; a multi-scale quantizer
    gives one level (s, s) per scale instead, coarse to fine, the last one the grid."""

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def token_shape(self) -> tuple[int, ...] | tuple[tuple[int, int], ...]:
        scales = code_scales(self)
        if scales:
            return tuple((s, s) for s in scales)
        side = self.config.image_size // self.config.downsample
        stages = num_stages(self.quantizer)
        return (side, side) if stages == 1 else (side, side, stages)
