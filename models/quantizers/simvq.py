"""SimVQ (Zhu et al. 2024, "Addressing representation collapse in vector quantized models with
one linear layer"): the codebook is a frozen random matrix C (K, d) seen through one learned
linear map W, so the codes are C·W. Every gradient step on W moves *all* codes at once, which
keeps the whole codebook in use without EMA, k-means or restarts (and needs no collectives).

Loss: ‖sg(z) − q‖² (trains W) + β‖z − sg(q)‖² (commitment); the gradient reaches z by
straight-through or, with `rotation_trick`, by the rotation trick. Distances run in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.quantizers.rotation import rotation_trick
from tokenmill.models.quantizers.vector_quantizer import QuantizerOutput, straight_through


class SimVQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int = 512, beta: float = 0.25, rotation_trick: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.beta, self.rotation_trick = dim, codebook_size, beta, rotation_trick
        generator = torch.Generator().manual_seed(seed)
        # Frozen (a buffer: saved, never optimised); N(0, 1/d) rows as in the paper.
        self.register_buffer("frozen_codebook", torch.randn(codebook_size, dim, generator=generator) / dim**0.5)
        self.transform = nn.Linear(dim, dim, bias=False)

    def codebook(self) -> Tensor:
        """(K, dim) fp32 implicit codes C·W."""
        return self.transform(self.frozen_codebook.float())

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., dim) -> codes (..., dim), indices (...)."""
        with torch.autocast(z.device.type, enabled=False):
            flat, codebook = z.float().reshape(-1, self.dim), self.codebook()  # (N, d), (K, d)
            with torch.no_grad():
                sq = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)  # (N, K)
                indices = torch.addmm(sq, flat, codebook.t(), alpha=-2.0).argmin(1)
            quantized = F.embedding(indices, codebook)  # (N, d), differentiable in W
            loss = F.mse_loss(quantized, flat.detach()) + self.beta * F.mse_loss(flat, quantized.detach())
            gradient_path = rotation_trick if self.rotation_trick else straight_through
            codes = gradient_path(quantized.detach(), flat)
        return QuantizerOutput(codes.reshape(z.shape), indices.reshape(z.shape[:-1]), loss)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) int64 -> (..., dim), exactly the forward's codes."""
        with torch.autocast(indices.device.type, enabled=False):
            return F.embedding(indices, self.codebook())
