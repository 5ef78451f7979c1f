"""Detokenizing: stored codes or latents back to images through the store's model (the inverse of
`pipeline.tokenize`; image *file* decoding is `pipeline.shards.images`).

Rows are item indices over the store's good samples in store order (input shard order, then tar
order; `split` picks one split, as `TokenDataset` numbers them). The model is the one the
store's lineage names (or `model_ref`), checked against the recorded weights sha256.
"""

from __future__ import annotations

from pathlib import Path

GRID = 64  # images per PNG (8 x 8)


def detokenize_store(store_url: str, out: Path, start: int, stop: int, *, split: str | None = None,
                 model_ref: str | None = None, tracking_uri: str | None = None,
                 storage_options: dict | None = None) -> list[Path]:
    """Decode items [start, stop) of `store_url` and write them as PNG grids of 64 under `out`."""
    import numpy as np
    import torch

    from models.errors import UserError
    from pipeline.grids import save_png_grid
    from pipeline.tokens.store import TokenStore

    store = TokenStore(store_url, storage_options)
    attrs = store.token_attrs()
    model = store_tokenizer(store_url, model_ref, tracking_uri, storage_options).load()[0].eval()
    rows = store.item_rows(split)[start:stop]
    if len(rows) == 0:
        raise UserError(f"{store_url} has {len(store.item_rows(split))} items; --rows {start}:{stop} selects none")
    group = store.open_group("r")
    names = [spec["name"] for spec in attrs["arrays"]]
    paths = []
    for i in range(0, len(rows), GRID):
        chunk = rows[i : i + GRID]
        # Contiguous runs make whole-chunk reads; zarr's orthogonal index handles any set.
        values = [torch.from_numpy(group[n].oindex[chunk].astype(np.float32 if n == "latents" else np.int64))
                  for n in names]
        with torch.no_grad():
            images = model.decode(values[0] if len(values) == 1 else tuple(values))
        paths.append(save_png_grid(images, out / f"grid-{(start + i) // GRID:05d}.png"))
    return paths


def store_tokenizer(store_url: str, model_ref: str | None = None, tracking_uri: str | None = None,
                    storage_options: dict | None = None, hint: str = "pass the store's model with --model"):
    """The `ModelFiles` of the tokenizer that made `store_url` (its lineage's `model_uri`, or
    `model_ref`), checked against the lineage's weights sha256: UserError when it cannot be read
    or its weights differ, so a job stops before any work."""
    from models.errors import UserError
    from pipeline.registry.model_ref import resolve_model
    from pipeline.tokens.store import TokenStore

    lineage = TokenStore(store_url, storage_options).token_attrs()["lineage"]
    ref = model_ref or lineage["model_uri"]
    try:
        files = resolve_model(ref, tracking_uri, storage_options)
    except UserError as err:
        raise UserError(f"the tokenizer of {store_url} cannot be read: {err}; {hint}") from None
    if files.weights_sha256 != lineage["weights_sha256"]:
        raise UserError(f"{files.uri} has weights sha256 {files.weights_sha256[:12]}…, but {store_url} was "
                        f"made with {lineage['weights_sha256'][:12]}…; {hint}")
    return files


def codes_to_images(tokenizer, codes, grid: list[list[int]]):
    """Code sequences (n, N) int64 (levels concatenated in raster order, as TokenDataset and a
    prior lay them out) -> images (n, C, H, W) in [0, 1] through `tokenizer.decode`."""
    import torch

    levels, start = [], 0
    for h, w in grid:
        levels.append(codes[:, start : start + h * w].reshape(-1, h, w))  # (n, h, w)
        start += h * w
    with torch.no_grad():
        return tokenizer.decode(levels[0] if len(levels) == 1 else tuple(levels)).float().clamp(0, 1)
