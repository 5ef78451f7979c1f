"""`tokenmill fid-stats SHARDS --split val --out ref.npz`: reference statistics for gFID and
precision/recall (pipeline/reference_stats.py): mu, sigma and the 2048-d features of FID's Inception
over a shard split, with the protocol (resolution, resize filter, crop, split, N, evaluator,
weights sha256) inside the file and in the JSON summary. Needs torch-fidelity's Inception weights
(`--inception PATH_OR_URL`, default the torch hub cache); `tokenmill sample --eval ref.npz` and
any tool that reads `mu`/`sigma` from an .npz use the result.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_inception_options, add_json_option, json_object, output_path, positive_int

if TYPE_CHECKING:
    from tokenmill.pipeline.reference_stats import StatsSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fid-stats", help="reference Inception statistics of a shard split (for gFID, precision/recall)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="SHARDS", help="shard folder/URL with manifest.json")
    parser.add_argument("--split", default="val", help="split to summarise (default %(default)s)")
    parser.add_argument("--out", required=True, type=output_path(folder=False, convert=str),
                        help="the .npz to write (path or fsspec URL)")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="images are brought to this size first (default: the split's first image's shorter side)")
    parser.add_argument("--crop", choices=("center-crop", "resize"), default="center-crop",
                        help="center-crop keeps the aspect, resize squashes (default %(default)s)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the split's first N images")
    add_inception_options(parser)
    parser.add_argument("--batch-size", type=positive_int, default=50)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 … (default %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="log the result to this MLflow")
    parser.add_argument("--storage-options", type=json_object, default={}, help="fsspec options as JSON")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> StatsSummary:
    from tokenmill.pipeline.generation_eval import InceptionWeights
    from tokenmill.pipeline.reference_stats import StatsOptions, reference_stats

    options = StatsOptions(resolution=args.resolution, crop=args.crop, limit=args.limit, batch_size=args.batch_size,
                           inception=InceptionWeights(args.inception, args.inception_sha256, args.storage_options),
                           device=args.device, storage_options=args.storage_options, tracking_uri=args.tracking_uri)
    summary = reference_stats(args.data, args.split, args.out, options)
    print(f"wrote {summary.out}: {summary.images} {summary.split} images at {summary.protocol['resolution']} px "
          f"({summary.protocol['crop']}), sha256 {summary.out_sha256[:16]}…")
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("fid-stats"))
