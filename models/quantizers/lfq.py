"""Lookup-free quantization (LFQ, MAGVIT-v2 / Open-MAGVIT2) and binary spherical quantization
(BSQ, Zhao et al. 2024): each of `bits` latent dimensions becomes a sign bit, the code is the
vector of signs and its index the bits read as a binary number (bit i has weight 2^i), so a
codebook of 2^bits needs no table and no lookup.

LFQ codes are ±1; BSQ first l2-normalises the latent and its codes are ±1/√bits (on the unit
sphere). Both train with the straight-through estimator, a β commitment term, and the entropy
penalty of entropy.py (confident bits, all codes used over the *global* batch), computed in fp32
with one all-reduce per training step; eval mode and no_grad run no collective and skip it.

Data-dependent init (LFQ's counterpart of VQ's k-means init): the first training batch shifts
and scales `project_in` so each bit has mean 0 and std 1 over the global batch. A default-init
Linear on an encoder's output gives nearly the same h to every row (in the bench's VQ-VAE the
per-bit offset is 10–30× the spread across rows), so every row gets the same code; the sign
bits, the commitment term and the sharp soft assignment (its gradient ∝ p(1 − p) ≈ e^(−4τ|h|))
then keep it that way and the entropy penalty cannot pull the rows apart. Without a projection
(bits == dim) the encoder's own output is quantized as it is.

Temperature: the bit logit is 4·τ·scale·h, so the penalty's gradient lives within ~1/(4τ) of a
bit boundary. The default τ = 1 (BSQ's reference value) keeps it alive at the code (LFQ logit 4,
p = 0.98); τ = 100 (MAGVIT-v2's, vector-quantize-pytorch's default) saturates it for |h| ≳ 0.01,
and in the bench's VQ-VAE cost 2.4–2.6 dB PSNR against τ = 1 (README, quantizers bench).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.quantizers.collectives import Collectives
from tokenmill.models.quantizers.entropy import entropy_penalty
from tokenmill.models.quantizers.vector_quantizer import QuantizerOutput, straight_through


class LFQ(nn.Module):
    spherical = False

    def __init__(self, dim: int, bits: int = 10, beta: float = 0.25, entropy_weight: float = 0.1,
                 diversity: float = 1.0, inv_temperature: float = 1.0, group_bits: int = 10) -> None:
        super().__init__()
        if not 1 <= bits <= 31:
            raise ValueError(f"LFQ/BSQ bits must be in [1, 31] (codebook 2^bits), got {bits}")
        self.dim, self.bits, self.codebook_size = dim, bits, 2**bits
        self.beta, self.entropy_weight, self.diversity = beta, entropy_weight, diversity
        self.inv_temperature, self.group_bits = inv_temperature, group_bits
        self.scale = 1 / math.sqrt(bits) if self.spherical else 1.0  # |code value| per bit
        self.project_in = nn.Linear(dim, bits) if bits != dim else nn.Identity()
        self.project_out = nn.Linear(bits, dim) if bits != dim else nn.Identity()
        self.register_buffer("_basis", 2 ** torch.arange(bits), persistent=False)  # (bits,) int64
        self.collectives = Collectives()
        self.register_buffer("initted", torch.tensor(not isinstance(self.project_in, nn.Linear)))
        self._host_initted: bool | None = None  # host copy: no device read on every step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "initted", torch.tensor(True))  # saved before the init existed: trained
        self._host_initted = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _init_projection(self, z: Tensor) -> None:
        """project_in such that h = project_in(z) has per-bit mean 0, std 1 over the global batch.
        z: (N, dim) fp32; one all-reduce, the same result on every rank."""
        h = self.project_in(z)  # (N, bits)
        stats = torch.cat([h.sum(0), h.pow(2).sum(0), h.new_full((1,), h.shape[0])])
        self.collectives.all_reduce(stats)  # (2 bits + 1,) global Σh | Σh² | rows
        rows = stats[-1].clamp(min=1)
        mean = stats[: self.bits] / rows
        gain = ((stats[self.bits : -1] / rows - mean**2).clamp(min=0).sqrt() + 1e-6).reciprocal()  # (bits,)
        self.project_in.weight.mul_(gain[:, None])
        self.project_in.bias.sub_(mean).mul_(gain)
        self.initted.fill_(True)
        self._host_initted = True

    def _signs(self, bits_on: Tensor) -> Tensor:
        """bool (..., bits) -> fp32 codes ±scale."""
        return torch.where(bits_on, self.scale, -self.scale).float()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., dim) -> codes (..., dim), indices (...) in [0, 2^bits)."""
        with torch.autocast(z.device.type, enabled=False):
            if self._host_initted is None:
                self._host_initted = bool(self.initted)
            if not self._host_initted and self.training and torch.is_grad_enabled():
                self._init_projection(z.float().reshape(-1, self.dim))
            h = self.project_in(z.float()).reshape(-1, self.bits)  # (N, bits) fp32
            if self.spherical:
                h = F.normalize(h, dim=-1)
            on = h > 0
            quantized, indices = self._signs(on), (on.long() * self._basis).sum(-1)  # (N, bits), (N,)
            loss = self.beta * F.mse_loss(h, quantized)
            if self.training and torch.is_grad_enabled() and self.entropy_weight > 0:
                logits = 4 * self.inv_temperature * self.scale * h  # p(bit on | z) = sigmoid(logit)
                loss = loss + self.entropy_weight * entropy_penalty(logits, self.group_bits, self.diversity,
                                                                    self.collectives)
            codes = self.project_out(straight_through(quantized, h))
        return QuantizerOutput(codes.reshape(*z.shape[:-1], self.dim), indices.reshape(z.shape[:-1]), loss)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) int64 -> (..., dim), exactly the forward's codes."""
        with torch.autocast(indices.device.type, enabled=False):
            return self.project_out(self._signs((indices.unsqueeze(-1) & self._basis) != 0))


class BSQ(LFQ):
    """LFQ on the unit sphere: l2-normalised latents, codes ±1/√bits."""

    spherical = True
