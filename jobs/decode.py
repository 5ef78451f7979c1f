"""`tokenmill decode STORE --out DIR [--rows a:b]`: tokens back to images, as PNG grids.

Rows are item indices over the store's good samples in store order (input shard order, then tar
order; `--split` picks one split, as `TokenDataset` numbers them). The model is the one the
store's lineage names (or `--model`), checked against the recorded weights sha256.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jobs.cli import add_json_option

GRID = 64  # images per PNG (8 x 8)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("decode", help="decode a token store's rows back to images (PNG grids)")
    parser.add_argument("store", help="token store URL")
    parser.add_argument("--out", required=True, type=Path, help="folder for grid-XXXXX.png")
    parser.add_argument("--rows", default="0:64", help="item range a:b (default %(default)s)")
    parser.add_argument("--split", default=None, help="number items within one split (default: all)")
    parser.add_argument("--model", default=None, help="model to decode with (default: the store's lineage)")
    parser.add_argument("--tracking-uri", default=None)
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start, stop = _parse_rows(args.rows)
    paths = decode_store(args.store, args.out, start, stop, split=args.split, model_ref=args.model,
                         tracking_uri=args.tracking_uri)
    print(f"wrote {len(paths)} PNG grid(s) to {args.out}")
    return {"store": args.store, "rows": [start, stop], "pngs": [str(p) for p in paths]}


def _parse_rows(text: str) -> tuple[int, int]:
    from models.errors import UserError

    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--rows {text!r}: expected a:b, e.g. 0:64") from None
    if not 0 <= a < b:
        raise UserError(f"--rows {text!r}: need 0 <= a < b")
    return a, b


def decode_store(store_url: str, out: Path, start: int, stop: int, *, split: str | None = None,
                 model_ref: str | None = None, tracking_uri: str | None = None,
                 storage_options: dict | None = None) -> list[Path]:
    """Decode items [start, stop) of `store_url` and write them as PNG grids of 64 under `out`."""
    import numpy as np
    import torch

    from models.errors import UserError
    from pipeline.images import save_png_grid
    from pipeline.model_ref import resolve_model
    from pipeline.token_encoder import TokenEncoder
    from pipeline.token_store import TokenStore

    store = TokenStore(store_url, storage_options)
    attrs = store.attrs()
    lineage = attrs["lineage"]
    files = resolve_model(model_ref or lineage["model_uri"], tracking_uri, storage_options)
    if files.weights_sha256 != lineage["weights_sha256"]:
        raise UserError(f"{files.uri} has weights sha256 {files.weights_sha256[:12]}…, but {store_url} was "
                        f"made with {lineage['weights_sha256'][:12]}…; pass the store's model with --model")
    model = TokenEncoder(files, latents=lineage["mode"] == "latents").model
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
