"""`tokenmill shard SRC DEST`: write WebDataset shards + manifest.json; `tokenmill shard index URL`
builds the manifest of existing shards (e.g. img2dataset output) by scanning them.

SRC is an image folder (searched recursively), a .npy/.npz file or builtin:mnist5k /
builtin:digits; DEST and URL are fsspec URLs (local path, memory://, s3://, gs://). Samples are
written in a seeded random order (--seed, recorded in the manifest; --no-shuffle keeps source
order), so class-sorted sources give shards that mix classes; the val split is chosen by a hash
of each key. The same command gives byte-identical shards, and rerunning it resumes: shards the
manifest lists as complete are skipped.
"""

from __future__ import annotations

import argparse
from typing import Any

# What a shard writer leaves in DEST (a rerun resumes there): its manifest, shards, shards in progress.
SHARD_MARKS = ("manifest.json", "*.tar", "*.partial")


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, fraction, json_object, number_in, positive_float, positive_int

    parser = subparsers.add_parser(
        "shard", help="write images as WebDataset shards with a manifest (or `shard index URL`)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="image folder, .npy/.npz, builtin:NAME, or the word `index`")
    parser.add_argument("dest", metavar="DEST", help="output folder URL (with `index`: the folder of shards)")
    parser.add_argument("--format", dest="image_format", choices=["png", "jpg", "webp"], default="png")
    parser.add_argument("--quality", type=number_in(int, 1, 100), default=95, help="jpg/webp quality (default %(default)s)")
    parser.add_argument("--maxcount", type=positive_int, default=None,
                        help="samples per shard (default 10000; 1000 for builtin: sources)")
    parser.add_argument("--maxsize", type=positive_float, default=1e9, help="payload bytes per shard (default %(default)g)")
    parser.add_argument("--val-fraction", type=fraction, default=0.1,
                        help="share of keys (by sha1 hash) in the val split (default %(default)s)")
    parser.add_argument("--prefix", default="", help="shard name prefix: PREFIX-train-000000.tar")
    parser.add_argument("--class-from-subfolder", action="store_true", help="label = first sub-folder name")
    parser.add_argument("--labels", help=".npy of integer labels for a .npy source")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the shuffled sample order, recorded in the manifest (default %(default)s)")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="write samples in source (key) order instead of a seeded random order")
    parser.add_argument("--split", choices=["train", "val"], help="with `index`: the split of every shard "
                        "(default: guessed from names containing val/test)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="parallel shard writers (Ray actors), each its own shard sequence; the same "
                             "seed and N give the same tars, another N other shard boundaries (default 1)")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help='fsspec storage options, e.g. \'{"anon": true}\'')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.jobs.cli import check_output_setting
    from tokenmill.pipeline.config import validate
    from tokenmill.pipeline.shards.manifest import index_shards, manifest_url, write_manifest
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    if args.src == "index":
        manifest, problems = index_shards(args.dest, args.storage_options, split=args.split,
                                          progress=not args.no_progress)
        write_manifest(args.dest, manifest, args.storage_options)
        print(f"indexed {len(manifest['shards'])} shards, {manifest['samples']} samples -> {manifest_url(args.dest)}"
              f"{f'; {len(problems)} problems (see `tokenmill inspect --verify`)' if problems else ''}")
        return dict(manifest=manifest_url(args.dest), shards=len(manifest["shards"]), samples=manifest["samples"],
                    splits=manifest["splits"], formats=manifest["formats"], image_stats=manifest["image_stats"],
                    problems=problems)
    options = dict(
        image_format=args.image_format, quality=args.quality, maxcount=args.maxcount, maxsize=int(args.maxsize),
        val_fraction=args.val_fraction, prefix=args.prefix, class_from_subfolder=args.class_from_subfolder,
        labels=args.labels, shuffle=args.shuffle, seed=args.seed,
    )
    settings = validate(ShardSettings, options, "tokenmill shard options")
    check_output_setting(args.dest, "DEST", marks=SHARD_MARKS, storage_options=args.storage_options)
    if args.workers > 1:
        from tokenmill.pipeline.shards.parallel_writer import write_shards_parallel

        summary = write_shards_parallel(args.src, args.dest, settings, args.storage_options, args.workers,
                                        progress=not args.no_progress)
    else:
        summary = write_shards(args.src, args.dest, settings, args.storage_options, progress=not args.no_progress)
    splits = ", ".join(f"{name} {s['samples']} in {s['shards']} shards" for name, s in summary["splits"].items())
    print(f"{summary['samples']} samples ({splits}); {summary['shards_written']} shards written, "
          f"{summary['shards_already_complete']} already complete -> {summary['manifest']}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable source images, e.g. {summary['skipped'][0]}")
    return summary
