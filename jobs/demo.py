"""`tokenmill demo`: the main job end to end on embedded defaults, on this machine.

1. shard the built-in MNIST-5k digits into WebDataset tars (+ manifest);
2. train a VQ-VAE (configs/vqvae_mnist.yaml) with 2 DDP workers on local Ray, tracked in a
   SQLite MLflow store, and register the model;
3. tokenize every shard into a Zarr token store with the registered model;
4. decode a few token rows back into a PNG grid,
then print where everything is. Rerunning resumes: finished shards, training and tokenization
are found complete and skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jobs.cli import add_json_option, output_folder, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="shard MNIST-5k, train a VQ-VAE on local Ray, tokenize it into Zarr",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=output_folder, default=Path("runs/demo"), help="output directory (default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=600, help="training steps (default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=2, help="DDP workers (default %(default)s)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.demo import run_demo

    return run_demo(args.root, args.steps, args.workers)
