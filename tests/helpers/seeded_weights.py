"""Weights of a reference model regenerated from a seed (tests/helpers/llamagen.py, magvit2.py): the
recorded test data holds the state dict's layout, the seed and the sha256, not megabytes of floats."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def draw_weights(layout: list, seed: int, fixed: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The state dict for `layout` ([[key, shape], ...] in state-dict order): weights of rank > 1
    ~ N(0, 1/fan_in), GroupNorm scales 1 + 0.1·N, other vectors 0.1·N (so a swapped mapping shows),
    drawn in layout order from numpy's legacy RandomState (its streams never change) in float64 and
    rounded to float32; a key in `fixed` takes that value and draws nothing."""
    rng, fixed = np.random.RandomState(seed), fixed or {}
    state = {}
    for key, shape in layout:
        if key in fixed:
            value = fixed[key]
        elif len(shape) > 1:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    return state


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for value in state.values():
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()
