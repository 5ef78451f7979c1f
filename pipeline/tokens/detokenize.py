"""Detokenizing: stored codes or latents back to images through the store's model (the inverse of
`pipeline.tokenize`; image *file* decoding is `pipeline.shards.images`).

Rows are item indices over the store's good samples in store order (input shard order, then tar
order; `split` picks one split, as `TokenDataset` numbers them). The model is the one the
store's lineage names (or `model_ref`), checked against the recorded weights sha256.
"""

from __future__ import annotations

from pathlib import Path

GRID = 64  # images per PNG (8 x 8)


def resolve_recorded_model(ref: str, weights_sha256: str, owner: str, hint: str, tracking_uri: str | None = None,
                           storage_options: dict | None = None):
    """The model `ref` (a `ModelFiles`) after checking its weights are the ones `owner` (a store,
    a prior) recorded in its lineage; UserError ending with `hint` when they are not."""
    from models.errors import UserError
    from pipeline.registry.model_ref import resolve_model

    files = resolve_model(ref, tracking_uri, storage_options)
    if files.weights_sha256 != weights_sha256:
        raise UserError(f"{files.uri} has weights sha256 {files.weights_sha256[:12]}…, but {owner} was "
                        f"made with {weights_sha256[:12]}…; {hint}")
    return files


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
    lineage = attrs["lineage"]
    files = resolve_recorded_model(model_ref or lineage["model_uri"], lineage["weights_sha256"], store_url,
                                   "pass the store's model with --model", tracking_uri, storage_options)
    model = files.load()[0].eval()
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
