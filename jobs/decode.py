"""`tokenmill decode STORE --out DIR [--rows a:b]`: tokens back to images, as PNG grids.

Rows are item indices over the store's good samples in store order (input shard order, then tar
order; `--split` picks one split, as `TokenDataset` numbers them). The model is the one the
store's lineage names (or `--model`), checked against the recorded weights sha256.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokenmill.jobs.cli import add_json_option, output_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("decode", help="decode a token store's rows back to images (PNG grids)")
    parser.add_argument("store", help="token store URL")
    parser.add_argument("--out", required=True, type=output_path(marks=("grid-*.png",)),
                        help="folder for grid-XXXXX.png")
    parser.add_argument("--rows", default="0:64", help="item range a:b (default %(default)s)")
    parser.add_argument("--split", default=None, help="number items within one split (default: all)")
    parser.add_argument("--model", default=None, help="model to decode with, also diffusers:PATH (default: the store's lineage)")
    parser.add_argument("--tracking-uri", default=None,
                        help="registry to look for the store's model in when its recorded copies and registry "
                             "fail (default: MLFLOW_TRACKING_URI, else ./runs/mlflow.db)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.pipeline.tokens.detokenize import detokenize_store

    start, stop = _parse_rows(args.rows)
    paths = detokenize_store(args.store, args.out, start, stop, split=args.split, model_ref=args.model,
                             tracking_uri=args.tracking_uri)
    print(f"wrote {len(paths)} PNG grid(s) to {args.out}")
    return {"store": args.store, "rows": [start, stop], "pngs": [str(p) for p in paths]}


def _parse_rows(text: str) -> tuple[int, int]:
    from tokenmill.models.errors import UserError

    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--rows {text!r}: expected a:b, e.g. 0:64") from None
    if not 0 <= a < b:
        raise UserError(f"--rows {text!r}: need 0 <= a < b")
    return a, b
