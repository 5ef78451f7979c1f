"""`tokenmill inspect TARGET [--verify]`: what a dataset holds, and whether it is intact.

TARGET is dispatched to the first inspector in INSPECTORS whose `detect` accepts it; each
inspector prints a few lines and returns a JSON-ready dict. Shards: a folder of WebDataset
shards (with or without manifest.json), a manifest.json URL or one .tar URL. Token stores: the
Zarr store written by `tokenmill tokenize`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, NamedTuple


class Inspector(NamedTuple):
    name: str
    detect: Callable[[str, dict | None], bool]  # (url, storage_options) -> handles it?
    inspect: Callable[[str, argparse.Namespace], dict[str, Any]]


def _is_shards(url: str, storage_options: dict | None) -> bool:
    from tokenmill.pipeline.runtime.storage import filesystem, join

    if url.endswith((".tar", "manifest.json")):
        return True
    fs, path = filesystem(url, storage_options)
    return fs.isdir(path) and (fs.isfile(join(path, "manifest.json")) or bool(fs.glob(join(path, "*.tar"))))


def inspect_shards(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Counts, splits, formats and image statistics; with --verify every shard is re-read:
    sha256 and count against the manifest, every member decoded, problems listed by key."""
    from tokenmill.pipeline.shards.verify import inspect_shards as describe

    result = describe(url, args.storage_options, args.verify)
    print(f"{url}: {result['shards']} shards, {result['samples']} samples")
    for split, s in result["splits"].items():
        print(f"  {split}: {s['samples']} samples in {s['shards']} shards")
    stats = result["image_stats"]
    print(f"  formats {result['formats']}; size h {stats['height']} w {stats['width']}; "
          f"channels {stats['channels']}; mean {stats['mean']} std {stats['std']}")
    if args.verify:
        problems = result["problems"]
        print(f"  verify: {'OK' if not problems else f'{len(problems)} problems'}")
        for p in problems:
            print(f"    {p['shard']} key={p['key'] or '-'}: {p['reason']}")
    return result


def _is_token_store(url: str, storage_options: dict | None) -> bool:
    from tokenmill.pipeline.runtime.storage import filesystem, join

    fs, path = filesystem(url, storage_options)
    return fs.isfile(join(path, "zarr.json"))


def inspect_token_store(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Shape, dtype and chunking of every array, lineage, progress and codebook statistics."""
    from tokenmill.pipeline.tokens.store import describe_store

    result = describe_store(url, args.storage_options)
    lineage = result["lineage"]
    print(f"{url}: token store ({result['state']}), {result['input_shards']['finished']}/"
          f"{result['input_shards']['total']} input shards finished")
    print(f"  model {lineage['model_uri']} version {lineage.get('model_version')} "
          f"(weights sha256 {lineage['weights_sha256'][:12]}…), {lineage['mode']}, "
          f"codebook {lineage.get('codebook_size')}, token shape {lineage['token_shape']}")
    for name, array in result["arrays"].items():
        print(f"  {name}: shape {array['shape']} {array['dtype']} chunks {array['chunks']} shards {array['shards']}")
    if result["summary"]:
        print(f"  summary: {json.dumps(result['summary'], sort_keys=True)[:600]}")
    print(f"  corrupt samples skipped: {len(result['corrupt'])}")
    return result


# First match wins.
INSPECTORS = [Inspector("shards", _is_shards, inspect_shards),
              Inspector("token_store", _is_token_store, inspect_token_store)]


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, json_object

    parser = subparsers.add_parser(
        "inspect", help="summarize shards (optionally verify them) or a token store",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET", help="shards (folder, manifest.json or .tar) or a token store URL")
    parser.add_argument("--verify", action="store_true", help="re-read everything; list corrupt members by key")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="fsspec storage options as JSON")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.runtime.storage import filesystem

    fs, path = filesystem(args.target, args.storage_options)
    if not fs.exists(path):
        raise UserError(f"{args.target} does not exist; check the URL")
    for inspector in INSPECTORS:
        if inspector.detect(args.target, args.storage_options):
            return dict(kind=inspector.name, **inspector.inspect(args.target, args))
    kinds = ", ".join(i.name for i in INSPECTORS)
    raise UserError(f"{args.target}: not a dataset tokenmill can inspect ({kinds}); check the URL")
