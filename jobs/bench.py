"""`tokenmill bench NAME`: benchmarks that print a ratio against a baseline measured in the same run.

Each benchmark is a module `benchmarks.<name>` with `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ["vae", "stream", "tokenize", "train", "quantizers", "vqgan", "prior", "prior_families", "scale"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and report it against its baseline")
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        importlib.import_module(f"tokenmill.benchmarks.{name}").register(names)
