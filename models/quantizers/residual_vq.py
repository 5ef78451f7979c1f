"""ResidualVQ: N VectorQuantizer stages, each quantizing what the previous ones left over.

One optional factorized projection wraps all stages; the straight-through estimator is applied
once to the sum of stage codes (per-stage straight-through would scale the encoder gradient by N).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenmill.models.quantizers.vector_quantizer import QuantizerOutput, VectorQuantizer, straight_through


class ResidualVQ(nn.Module):
    def __init__(self, dim: int, num_stages: int = 4, codebook_size: int = 512, codebook_dim: int = 0,
                 seed: int = 0, **vq_options) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.num_stages = dim, codebook_size, num_stages
        lookup_dim = codebook_dim or dim
        factorized = lookup_dim != dim
        self.project_in = nn.Linear(dim, lookup_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if factorized else nn.Identity()
        self.stages = nn.ModuleList(
            VectorQuantizer(lookup_dim, codebook_size, seed=seed + i, **vq_options) for i in range(num_stages)
        )

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., dim) -> codes (..., dim), indices (..., stages)."""
        with torch.autocast(z.device.type, enabled=False):
            residual = start = self.project_in(z.float())  # (..., d)
            total = torch.zeros_like(start)
            indices, loss = [], start.new_zeros(())
            for stage in self.stages:
                out = stage(residual)
                quantized = out.codes.detach()
                residual = residual - quantized
                total = total + quantized
                indices.append(out.indices)
                loss = loss + out.loss
            codes = self.project_out(straight_through(total, start))
        return QuantizerOutput(codes, torch.stack(indices, -1), loss)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(..., stages) int64 -> (..., dim); sums the stages in forward's order (bit-identical)."""
        with torch.autocast(indices.device.type, enabled=False):
            total = None
            for i, stage in enumerate(self.stages):
                codes = stage.indices_to_codes(indices[..., i])
                total = codes if total is None else total + codes
            return self.project_out(total)
