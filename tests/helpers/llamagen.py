"""A tiny LlamaGen VQ tokenizer from committed test data (tests/data/llamagen/), written as LlamaGen's
`vq_train.py` saves its checkpoints: `{"model": state_dict, "steps", "args": argparse.Namespace}`.

No installable LlamaGen package is faithful, so its published source was run once, outside this
repository, and what it gave is data here (no LlamaGen code):
  - `tiny_vq.json`: the source commit, the tiny config, the checkpoint's `args`, the state dict's
    layout (every key and shape `VQModel.state_dict()` gave, in its order), the seed and rule
    the weights were drawn with (`helpers.seeded_weights.draw_weights`), and their sha256;
  - `tiny_vq.npz`: the codebook (drawn from the encoder's own outputs, so many codes are used),
    the input images (uint8), and LlamaGen's outputs on them: codes, decodes (its [-1, 1]
    scale, float32) and its training loss (vq + commitment).
The weights are regenerated here from the seed (numpy's legacy RandomState, whose streams never
change) instead of being stored: 0.9 M float32 weights would be 3.7 MB of test data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.seeded_weights import draw_weights, weights_sha256

DATA = Path(__file__).resolve().parent.parent / "data" / "llamagen"
CODEBOOK_KEY = "quantize.embedding.weight"


def tiny_case() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(tiny_vq.json, tiny_vq.npz's arrays)."""
    with np.load(DATA / "tiny_vq.npz") as arrays:
        return json.loads((DATA / "tiny_vq.json").read_text()), dict(arrays)


def tiny_state() -> dict[str, torch.Tensor]:
    """The reference's weights, checked against the sha256 they had when its outputs were made."""
    meta, arrays = tiny_case()
    fixed = {key: np.zeros(shape) for key, shape in meta["layout"] if key.endswith("codebook_used")}  # as before training
    state = draw_weights(meta["layout"], meta["seed"], {**fixed, CODEBOOK_KEY: arrays["codebook"]})
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
