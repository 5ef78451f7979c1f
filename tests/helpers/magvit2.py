"""A tiny Open-MAGVIT2 LFQ tokenizer from committed test data (tests/data/magvit2/), written as its
Lightning training saves it (`{"state_dict": ..., "epoch", "global_step", ...}`) with its YAML.

No installable Open-MAGVIT2 package is faithful, so its published source was run once, outside this
repository, and what it gave is data here (no Open-MAGVIT2 code):
  - `tiny_lfq.json`: the source commit, the YAML (`config`), the state dict's layout (every key and
    shape `VQModel.state_dict()` gave, in its order; `loss.*` a stand-in for the discriminator), the
    seed the weights were drawn with (`helpers.seeded_weights.draw_weights`) and their sha256;
  - `tiny_lfq.npz`: the input images (uint8) and Open-MAGVIT2's outputs on them: codes and decodes
    (its [-1, 1] scale, float32).
The weights are regenerated from the seed (numpy's legacy RandomState, whose streams never change).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from helpers.seeded_weights import draw_weights, weights_sha256

DATA = Path(__file__).resolve().parent.parent / "data" / "magvit2"


def tiny_case() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(tiny_lfq.json, tiny_lfq.npz's arrays)."""
    with np.load(DATA / "tiny_lfq.npz") as arrays:
        return json.loads((DATA / "tiny_lfq.json").read_text()), dict(arrays)


def tiny_state() -> dict[str, torch.Tensor]:
    """The reference's weights, checked against the sha256 they had when its outputs were made."""
    meta, _ = tiny_case()
    state = draw_weights(meta["layout"], meta["seed"])
    assert weights_sha256(state) == meta["weights_sha256"], "the regenerated weights differ from the reference's"
    return state


def write_config(path: Path, edit=None) -> Path:
    """The reference's YAML at `path`; `edit(config)` changes it first."""
    config, _ = tiny_case()
    config = config["config"]
    if edit:
        edit(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor] | None = None) -> str:
    """`folder/tiny.ckpt` (Lightning 2's layout) and `folder/tiny.yaml`; returns "CKPT,YAML"."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "tiny.ckpt"
    torch.save({"state_dict": tiny_state() if state is None else state, "epoch": 3, "global_step": 1000,
                "pytorch-lightning_version": "2.2.0", "optimizer_states": [], "lr_schedulers": []}, ckpt)
    return f"{ckpt},{write_config(folder / 'tiny.yaml')}"


def tiny_images() -> tuple[np.ndarray, torch.Tensor]:
    """uint8 (B, H, W, 3) as the tokenize path takes them, and (B, 3, H, W) float in [0, 1] as the
    reference saw them (2·x − 1 with x = uint8 / 255)."""
    _, arrays = tiny_case()
    images = arrays["images"]  # (B, 3, H, W) uint8
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), torch.from_numpy(images).float() / 255
