"""`tokenmill demo`: shard, train, tokenize and decode MNIST-5k on this machine (steps: pipeline/demo.py)."""

from __future__ import annotations

import argparse

from tokenmill.jobs.cli import add_json_option, output_path, positive_int
from tokenmill.pipeline import demo

# What run_demo writes under --root (pipeline/demo.py): a rerun there is ours.
DEMO_MARKS = ("shards", "tokens.zarr", "decoded", "samples", "demo-vqvae", "demo-prior", "ray", "mlflow.db")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="shard MNIST-5k, train a VQ-VAE on local Ray, tokenize it into Zarr, train a prior and sample digits",
        description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=output_path(marks=DEMO_MARKS), default="runs/demo", help="output directory (default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=600, help="training steps (default %(default)s)")
    parser.add_argument("--prior-steps", type=positive_int, default=600,
                        help="Transformer prior training steps (default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=2, help="DDP workers (default %(default)s)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> demo.DemoSummary:
    return demo.run_demo(args.root, args.steps, args.workers, args.prior_steps)
