"""Latent arrays of VAE-family models: one `latents` array, or one `latents_<group>` array per
latent group of a hierarchical VAE (`latent_shapes`, `group_names`; `encode` returns the groups
flattened and concatenated coarse to fine, `decode` takes them back in that layout)."""

from __future__ import annotations

import math

import torch


def latent_names(model: torch.nn.Module) -> list[str]:
    """Store array names: `latents`, or `latents_<resolution>[_<index>]` per group coarse -> fine."""
    groups = getattr(model, "group_names", None)
    if not getattr(model, "latent_shapes", None) or not groups:
        return ["latents"]
    return [f"latents_{name.replace('.', '_')}" for name in groups]


def split_latents(model: torch.nn.Module, flat: torch.Tensor) -> list[torch.Tensor]:
    """(B, L) as `encode` returns it -> one tensor per array of `latent_names` ((B, zc, r, r) per group)."""
    shapes = getattr(model, "latent_shapes", None)
    if not shapes:
        return [flat]
    sizes = [math.prod(shape) for shape in shapes]
    return [part.reshape(-1, *shape) for part, shape in zip(flat.split(sizes, dim=1), shapes)]


def join_latents(arrays: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of `split_latents`: (B, L) for the model's `decode`."""
    return torch.cat([a.flatten(1) for a in arrays], dim=1) if len(arrays) > 1 else arrays[0]
