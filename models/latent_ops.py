"""Latent-space operations for the VAE family (GaussianVAE, ConditionalVAE, HierarchicalVAE).

Codes are posterior means (B, L) (a hierarchical VAE's groups flattened into one vector). Paths and arithmetic act on codes; `decode` and `make_grid`
turn them back into image tensors; `pipeline.grids.save_png_grid` writes them as PNG.
"""

from __future__ import annotations

import torch
from torch import nn


def has_latent_paths(model: nn.Module) -> bool:
    """Whether `model` has continuous Gaussian codes to walk between: a KL term (VAE family) and
    `encode`/`decode`. VQ models encode to discrete codes, which have no paths."""
    return bool(getattr(model, "has_kl", False)) and callable(getattr(model, "encode", None)) \
        and callable(getattr(model, "decode", None))


@torch.no_grad()
def encode(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> posterior means (B, L)."""
    mu, _ = model.encode(x, y)
    return mu


@torch.no_grad()
def decode(model: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """z (B, L) -> mean images (B, C, H, W) in [0, 1]."""
    return model.decode(z, y)


def lerp(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """Straight path: z0, z1 (L,) -> (steps, L), endpoints included."""
    t = torch.linspace(0.0, 1.0, steps, device=z0.device).unsqueeze(1)  # (steps, 1)
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """Great-circle path (keeps the norm typical of Gaussian codes): (L,), (L,) -> (steps, L)."""
    t = torch.linspace(0.0, 1.0, steps, device=z0.device).unsqueeze(1)  # (steps, 1)
    cos = torch.dot(z0, z1) / (z0.norm() * z1.norm()).clamp(min=1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-4:  # nearly parallel: slerp degenerates to lerp
        return lerp(z0, z1, steps)
    sin = torch.sin(omega)
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / sin


def attribute_vector(codes: torch.Tensor, labels: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Mean code of class a minus mean code of class b: codes (N, L), labels (N,) -> (L,)."""
    if not (labels == a).any() or not (labels == b).any():
        raise ValueError(f"attribute_vector needs examples of both classes {a} and {b}")
    return codes[labels == a].mean(0) - codes[labels == b].mean(0)


def apply_attribute(codes: torch.Tensor, vector: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """codes (B, L) + s·vector for each s -> (B·len(scales), L), one row of scales per code."""
    steps = torch.tensor(scales, device=codes.device).view(1, -1, 1)  # (1, S, 1)
    return (codes.unsqueeze(1) + steps * vector).flatten(0, 1)


def interpolate(
    model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, steps: int = 8, mode: str = "slerp",
    y0: torch.Tensor | None = None, y1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image pairs x0, x1 (B, C, H, W) -> decoded paths (B·steps, C, H, W), one row per pair.
    Conditional models encode each end with its labels y0, y1 (B,) and decode a row under y0."""
    path = slerp if mode == "slerp" else lerp
    z0, z1 = encode(model, x0, y0), encode(model, x1, y1)
    codes = torch.cat([path(a, b, steps) for a, b in zip(z0, z1)])  # (B·steps, L)
    return decode(model, codes, None if y0 is None else y0.repeat_interleave(steps))


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) -> one image (C, rows·(H+p)+p, nrow·(W+p)+p), filled row by row."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = images.new_full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid
