"""A tiny LlamaGen VQ tokenizer from committed test data (tests/data/llamagen/), written as LlamaGen's
`vq_train.py` saves its checkpoints: `{"model": state_dict, "steps", "args": argparse.Namespace}`.

No installable LlamaGen package is faithful, so its published source was run once, outside this
repository, and what it gave is data here (no LlamaGen code):
  - `tiny_vq.json`: the source commit, the tiny config, the checkpoint's `args`, the state dict's
    layout (every key and shape `VQModel.state_dict()` gave, in its order), the seed and rule
    the weights were drawn with (`draw_weights`), and their sha256;
  - `tiny_vq.npz`: the codebook (drawn from the encoder's own outputs, so many codes are used),
    the input images (uint8), and LlamaGen's outputs on them: codes, decodes (its [-1, 1]
    scale, float32) and its training loss (vq + commitment).
The weights are regenerated here from the seed (numpy's legacy RandomState, whose streams never
change) instead of being stored: 0.9 M float32 weights would be 3.7 MB of test data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "llamagen"
CODEBOOK_KEY = "quantize.embedding.weight"


def tiny_case() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(tiny_vq.json, tiny_vq.npz's arrays)."""
    with np.load(DATA / "tiny_vq.npz") as arrays:
        return json.loads((DATA / "tiny_vq.json").read_text()), dict(arrays)


def draw_weights(layout: list, seed: int, codebook: np.ndarray) -> dict[str, torch.Tensor]:
    """The state dict for `layout` ([[key, shape], ...] in state-dict order): weights of rank > 1
    ~ N(0, 1/fan_in), GroupNorm scales 1 + 0.1·N, other vectors 0.1·N (so a swapped mapping shows),
    all drawn in layout order in float64 and rounded to float32; the usage buffer zeros (as before
    training) and the codebook given."""
    rng = np.random.RandomState(seed)
    state = {}
    for key, shape in layout:
        if key == CODEBOOK_KEY:
            value = codebook
        elif key.endswith("codebook_used"):
            value = np.zeros(shape)
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


def tiny_state() -> dict[str, torch.Tensor]:
    """The reference's weights, checked against the sha256 they had when its outputs were made."""
    meta, arrays = tiny_case()
    state = draw_weights(meta["layout"], meta["seed"], arrays["codebook"])
    assert weights_sha256(state) == meta["weights_sha256"], "the regenerated weights differ from the reference's"
    return state


def write_checkpoint(path: Path, state: dict[str, torch.Tensor] | None = None, args: bool = True,
                     **entries: Any) -> Path:
    """`path` as vq_train.py writes it (its `args` an argparse.Namespace), plus `entries` (e.g. `ema`)."""
    meta, _ = tiny_case()
    checkpoint: dict[str, Any] = {"model": tiny_state() if state is None else state, "steps": 1000, **entries}
    if args:
        checkpoint["args"] = argparse.Namespace(**meta["args"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def tiny_images() -> tuple[np.ndarray, torch.Tensor]:
    """The inputs: uint8 (B, H, W, 3) as the tokenize path takes them, and (B, 3, H, W) float in
    [0, 1] exactly as the reference saw them (2·x − 1 with x = uint8 / 255)."""
    _, arrays = tiny_case()
    images = arrays["images"]  # (B, 3, H, W) uint8
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), torch.from_numpy(images).float() / 255
