"""A prior's lineage: `lineage.json` next to its config.json, written by the training engine (the prior task) and read by
`tokenmill sample` to find the tokenizer that turns sampled codes back into images.

Keys: `store_url` (the token store it was trained on, absolute), `tokenizer_uri` and `tokenizer_sha256`
(the store's model and its weights hash, from the store's own lineage), `tokenizer_source` (every
way to find that model: its locations and registry, `pipeline.registry.resolver`; absent in
lineages of older versions), `tokenizer_version` (its registry version, or null), `vocab` (the token
layout, the prior config's `vocab()`), `grid` ((h, w) per level in store order; a level with a stages
axis (h, w, S) is the grid (h, w * S), its raster order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenmill.models.errors import UserError

LINEAGE_FILE = "lineage.json"
KEYS = ("store_url", "tokenizer_uri", "tokenizer_sha256", "vocab", "grid")
# Every prior kind's layout has these; the AR prior adds `bos`, MaskGIT `mask` (config.vocab()).
VOCAB_KEYS = ("codebook_size", "class_offset", "num_classes", "null_class")


def prior_lineage(store_url: str, store_lineage: dict[str, Any], vocab: dict[str, int],
                  grid: list[list[int]], tokenizer_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The lineage of a prior trained on `store_url`, whose own lineage (`TokenStore.token_attrs()
    ["lineage"]`) names the tokenizer; `vocab` is `PriorConfig.vocab()`; `tokenizer_source`: where
    the tokenizer is (default: what the store's lineage records)."""
    found = tokenizer_source or store_lineage.get("model_source")
    return {"store_url": store_url, "tokenizer_uri": store_lineage["model_uri"],
            "tokenizer_sha256": store_lineage["weights_sha256"],
            "tokenizer_version": store_lineage.get("model_version"),
            **({"tokenizer_source": found} if found else {}), "vocab": dict(vocab),
            "grid": [[int(v) for v in level] for level in grid]}


def write_prior_lineage(model_dir: str | Path, lineage: dict[str, Any]) -> Path:
    """Write `model_dir/lineage.json` (validated first, so a bad lineage never reaches disk)."""
    check_prior_lineage(lineage, str(model_dir))
    path = Path(model_dir) / LINEAGE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    return path


def read_prior_lineage(model_dir: str | Path) -> dict[str, Any]:
    """The lineage saved next to a prior's config.json; UserError when missing or malformed."""
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} has no {LINEAGE_FILE}; it was not saved by `tokenmill train-prior` "
                        "(pass the tokenizer with --tokenizer)")
    return parse_prior_lineage(path.read_bytes(), str(model_dir))


def parse_prior_lineage(data: bytes | str, where: str) -> dict[str, Any]:
    """`lineage.json`'s content -> the checked lineage dict; `where` names the prior in errors."""
    try:
        lineage = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: {LINEAGE_FILE} is not valid JSON ({err}); retrain or rewrite it") from None
    check_prior_lineage(lineage, where)
    return lineage


def check_prior_lineage(lineage: Any, where: str) -> None:
    missing = [k for k in KEYS if not isinstance(lineage, dict) or k not in lineage]
    if not missing and isinstance(lineage["vocab"], dict):
        missing = [f"vocab.{k}" for k in VOCAB_KEYS if k not in lineage["vocab"]]
    elif not missing:
        missing = ["vocab (an object)"]
    if missing:
        raise UserError(f"{where}: {LINEAGE_FILE} lacks {', '.join(missing)}; retrain the prior with this tokenmill")
    grid = lineage["grid"]
    if not isinstance(grid, list) or not grid or not all(isinstance(g, list) and len(g) == 2 for g in grid):
        raise UserError(f"{where}: {LINEAGE_FILE} grid must be a list of [h, w] per level, got {grid!r}")
