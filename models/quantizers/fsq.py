"""FSQ (finite scalar quantization, Mentzer et al. 2023): no codebook, each of len(levels)
dimensions is bounded and rounded to one of levels[i] values; the grid point is the code.

Indices are mixed-radix numbers over the per-dimension digits, a bijection between
[0, prod(levels)) and the grid. No statistics, so no collectives.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tokenmill.models.quantizers.vector_quantizer import QuantizerOutput, straight_through


class FSQ(nn.Module):
    def __init__(self, dim: int, levels: tuple[int, ...] | list[int] = (8, 5, 5, 5)) -> None:
        super().__init__()
        if any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {list(levels)}")
        self.dim, self.levels = dim, tuple(int(level) for level in levels)
        self.codebook_size = math.prod(self.levels)
        n = len(self.levels)
        self.project_in = nn.Linear(dim, n) if n != dim else nn.Identity()
        self.project_out = nn.Linear(n, dim) if n != dim else nn.Identity()
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)
        # Derived from the config: not saved in the state dict.
        self.register_buffer("_levels", levels_t, persistent=False)  # (n,)
        self.register_buffer("_half_width", (levels_t // 2), persistent=False)  # (n,)
        self.register_buffer("_basis", basis, persistent=False)  # (n,) int64

    def _bound(self, z: Tensor) -> Tensor:
        """Squash to (-L/2, L/2) so rounding yields exactly L integers (shifted for even L)."""
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (..., dim) -> codes (..., dim), indices (...)."""
        with torch.autocast(z.device.type, enabled=False):
            bounded = self._bound(self.project_in(z.float()))  # (..., n)
            digits = bounded.round()  # integers in [-L//2, L//2]
            normalized = straight_through(digits / self._half_width, bounded / self._half_width)
            indices = ((digits + self._half_width).long() * self._basis).sum(-1)
            codes = self.project_out(normalized)
        return QuantizerOutput(codes, indices, z.new_zeros((), dtype=torch.float32))

    def indices_to_grid(self, indices: Tensor) -> Tensor:
        """(...) int64 -> (..., n) normalized grid points in [-1, 1]."""
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels.long()
        return (digits - self._half_width) / self._half_width

    def grid_to_indices(self, grid: Tensor) -> Tensor:
        """(..., n) normalized grid points -> (...) int64; inverse of indices_to_grid."""
        return ((grid * self._half_width).round() + self._half_width).long().mul(self._basis).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        with torch.autocast(indices.device.type, enabled=False):
            return self.project_out(self.indices_to_grid(indices))
