"""MultiScaleQuantizer: VAR's multi-scale residual quantization (Tian et al. 2024), one shared codebook.

For scales s_1 < … < s_k = the grid side: the residual r starts as z; at each scale r is
area-downsampled to s×s, quantized with the one `VectorQuantizer`, bicubic-upsampled back to
the grid (not at the last scale, which is the grid) and subtracted from r; the upsampled maps
sum to z_q. Codes: one (B, s, s) map per scale, coarse to fine. The straight-through estimator
is applied once, to the sum (as in ResidualVQ); the loss is the mean over scales of the
codebook's per-scale commitment (and codebook) terms, as VAR averages its per-scale losses.

VAR's learned "phi" conv after each upsampling is left out: with EMA codebooks and the
straight-through sum it would only learn from an extra codebook-side loss, and without it
`indices_to_codes` is a plain lookup plus fixed resampling, and one scale is exactly a
VectorQuantizer.

Codebook learning: one k-means init (from the full-grid rows of z) and one EMA update per
training step from every scale's rows together (image-major, so two ranks' rows concatenate in
the order one process would hold them: restarts draw the same rows), through the codebook's own
`initialize`/`learn`, so DDP statistics go through its collectives exactly as for `vq`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.quantizers.vector_quantizer import QuantizerOutput, VectorQuantizer, straight_through

_VAR_LIKE_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 24, 32)  # for the example in error messages


def check_scales(scales, side: int | None = None) -> tuple[int, ...]:
    """`scales` as ints; ValueError unless strictly increasing from ≥ 1 and (given `side`) ending at it."""
    scales = tuple(int(s) for s in scales)
    increasing = bool(scales) and scales[0] >= 1 and all(a < b for a, b in zip(scales, scales[1:]))
    if increasing and (side is None or scales[-1] == side):
        return scales
    if side is None:
        raise ValueError(f"quantizer.scales {list(scales)} must be strictly increasing from 1 or more")
    example = [s for s in _VAR_LIKE_SCALES if s < side] + [side]
    raise ValueError(f"quantizer.scales {list(scales)} must be strictly increasing and end at the latent grid "
                     f"side {side} (image_size / downsample), e.g. {example}")


def _resize(x: Tensor, side: int, mode: str) -> Tensor:
    """(B, d, h, w) -> (B, d, side, side); the identity when already that size."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode=mode)


def _to_first(z: Tensor) -> Tensor:  # (B, h, w, d) -> (B, d, h, w)
    return z.permute(0, 3, 1, 2)


def _to_last(z: Tensor) -> Tensor:  # (B, d, h, w) -> (B, h, w, d)
    return z.permute(0, 2, 3, 1)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, dim: int, scales, codebook_size: int = 512, codebook_dim: int = 0, seed: int = 0,
                 **vq_options) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.scales = dim, codebook_size, check_scales(scales)
        lookup_dim = codebook_dim or dim
        factorized = lookup_dim != dim
        self.project_in = nn.Linear(dim, lookup_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if factorized else nn.Identity()
        self.vq = VectorQuantizer(lookup_dim, codebook_size, seed=seed, **vq_options)  # shared by all scales

    @property
    def side(self) -> int:
        return self.scales[-1]

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, side, side, dim) -> codes (B, side, side, dim), indices: one (B, s, s) per scale."""
        if z.dim() != 4 or z.shape[1] != self.side or z.shape[2] != self.side:
            raise ValueError(f"multiscale quantizer with scales {list(self.scales)} needs (B, {self.side}, "
                             f"{self.side}, dim) latents, got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            start = self.project_in(z.float())  # (B, H, W, d)
            learn = self.training and torch.is_grad_enabled()
            if learn:
                self.vq.initialize(start)
            residual = _to_first(start)  # (B, d, H, W), keeps the encoder's gradient for the commitment terms
            total = torch.zeros_like(residual)
            indices, rows, losses = [], [], []
            for scale in self.scales:
                small = _to_last(_resize(residual, scale, "area"))  # (B, s, s, d)
                out = self.vq(small, learn=False)
                quantized = _resize(_to_first(out.codes.detach()), self.side, "bicubic")  # (B, d, H, W)
                residual = residual - quantized
                total = total + quantized
                indices.append(out.indices)  # (B, s, s)
                rows.append(small.detach().reshape(z.shape[0], -1, small.shape[-1]))  # (B, s*s, d)
                losses.append(out.loss)
            if learn:  # image-major rows of every scale: (B, Σ s², d), (B, Σ s²)
                self.vq.learn(torch.cat(rows, 1), torch.cat([i.reshape(z.shape[0], -1) for i in indices], 1))
            # Contiguous: the factorized projection must see the same layout as in indices_to_codes.
            codes = self.project_out(straight_through(_to_last(total), start).contiguous())
        return QuantizerOutput(codes, tuple(indices), torch.stack(losses).mean())

    def indices_to_codes(self, indices: tuple[Tensor, ...] | Tensor) -> Tensor:
        """One (B, s, s) int64 map per scale (a lone tensor for one scale) -> (B, side, side, dim);
        sums the scales in forward's order (bit-identical)."""
        return self.cumulative_codes(indices)[-1]

    def cumulative_codes(self, indices: tuple[Tensor, ...] | Tensor) -> list[Tensor]:
        """The latents of the first 1, 2, …, k scales' codes (VAR's f̂ after each scale): k maps
        (B, side, side, dim), the last one `indices_to_codes(indices)`."""
        levels = (indices,) if isinstance(indices, Tensor) else tuple(indices)
        if len(levels) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} code maps (scales {list(self.scales)}), got {len(levels)}")
        with torch.autocast(levels[0].device.type, enabled=False):
            total, sums = None, []
            for codes in levels:  # (B, s, s)
                quantized = _resize(_to_first(self.vq.indices_to_codes(codes)), self.side, "bicubic")  # (B, d, H, W)
                total = torch.zeros_like(quantized) + quantized if total is None else total + quantized
                sums.append(self.project_out(_to_last(total).contiguous()))
            return sums
