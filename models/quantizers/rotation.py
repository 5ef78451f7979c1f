"""The rotation trick (Fifty et al. 2024, "Restructuring vector quantization with the rotation
trick"): instead of copying the decoder's gradient to the encoder output unchanged (straight-
through), pass it through the rotation + rescaling that maps the encoder output e onto its code q.

With ê = e/‖e‖, q̂ = q/‖q‖ and r = (ê + q̂)/‖ê + q̂‖ (all treated as constants), the Householder
form of the rotation is R = I − 2rrᵀ + 2q̂êᵀ, and the output is λ·R·e with λ = ‖q‖/‖e‖ (section 4.2).
Its value equals q up to rounding; `rotation_trick` returns exactly q in the forward pass (so it
is bit-identical to the straight-through output) and λ·R's Jacobian in the backward pass.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rotate_onto(e: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """λ·R·e for rows e (..., d) and targets q (..., d); differentiable in e only."""
    q = q.detach()
    e_norm, q_norm = e.detach().norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    e_hat, q_hat = e.detach() / e_norm.clamp(min=eps), q / q_norm.clamp(min=eps)
    r = F.normalize(e_hat + q_hat, dim=-1, eps=eps)
    rotated = e - 2 * (e * r).sum(-1, keepdim=True) * r + 2 * (e * e_hat).sum(-1, keepdim=True) * q_hat
    return rotated * (q_norm / e_norm.clamp(min=eps))


def rotation_trick(quantized: Tensor, inputs: Tensor) -> Tensor:
    """Value of `quantized`, gradient of the rotation of `inputs` onto it (a drop-in for
    `straight_through`). `rotated - rotated.detach()` is an exact zero, as there."""
    rotated = rotate_onto(inputs, quantized)
    return quantized.detach() + (rotated - rotated.detach())
