"""`tokenmill export STORE --format megatron|parquet OUT`: a finished token store for other training code.

megatron: OUT.bin + OUT.idx (megatron-core's indexed dataset; one sequence and one document
per sample) + OUT.json (lineage, vocabulary). parquet: one file OUT, one row per sample (key,
label, split, tokens), the same JSON in the schema metadata under `tokenmill`. Every sequence is
exactly `TokenDataset`'s item for the same `--split`, `--bos` and `--class-token`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tokenmill.jobs.cli import add_json_option, json_object, positive_int

if TYPE_CHECKING:
    from tokenmill.pipeline.tokens.export import ExportSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a token store as a Megatron indexed dataset or Parquet",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="token store URL (a finished `tokenmill tokenize` output)")
    parser.add_argument("--format", required=True, choices=["megatron", "parquet"], dest="fmt")
    parser.add_argument("out", help="megatron: path prefix for OUT.bin/.idx/.json; parquet: the file")
    parser.add_argument("--split", default="train", choices=["train", "val", "all"], help="default %(default)s")
    parser.add_argument("--bos", action="store_true", help="start every sequence with BOS = codebook size")
    parser.add_argument("--class-token", action="store_true", help="then the class token (as TokenDataset)")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="class tokens to reserve (default: the store's largest label + 1)")
    parser.add_argument("--batch-size", type=positive_int, default=4096, help="samples per read/write batch")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="fsspec options for the store and OUT, e.g. '{\"anon\": true}'")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> ExportSummary:
    from tokenmill.jobs.cli import check_output_setting
    from tokenmill.pipeline.tokens.export import export_store

    for path in ([f"{args.out}.bin", f"{args.out}.idx", f"{args.out}.json"] if args.fmt == "megatron" else [args.out]):
        check_output_setting(path, "OUT", folder=False, storage_options=args.storage_options)

    summary = export_store(
        args.store, args.fmt, args.out, split=args.split, add_bos=args.bos, class_token=args.class_token,
        num_classes=args.num_classes, batch_size=args.batch_size, storage_options=args.storage_options,
    )
    print(f"exported {summary.samples} {summary.split} samples ({summary.seq_len} tokens each, vocabulary "
          f"{summary.vocab_size}) as {summary.format}: {', '.join(summary.files)}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    from tokenmill.jobs.cli import module_main

    sys.exit(module_main("export"))
