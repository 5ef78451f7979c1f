"""`tokenmill inspect TARGET [--verify]`: what an artifact is, what it holds and what it was made from.

TARGET is dispatched to the first inspector in INSPECTORS whose `detect` accepts it; each
inspector prints a few lines and returns a JSON-ready dict (`--json PATH` writes it). Targets:

  shards       a folder of WebDataset shards (with or without manifest.json), a manifest.json URL or
               one .tar URL: counts, splits, image sizes, source and seed; --verify re-reads them
  token store  the Zarr store written by `tokenmill tokenize`: rows, levels, completeness, lineage
  model        a model folder or URL, runs:/…, models:/…, diffusers:PATH: class, config, parameters,
               weights sha256, where it came from (registry version, run, folder)
  prior        a model from `tokenmill train-prior`: the above, its kind (ar / maskgit / var),
               vocabulary, grid or scales, and its lineage (store, tokenizer)

Lineage is printed key by key, whatever keys the artifact records.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, NamedTuple


class Inspector(NamedTuple):
    name: str
    detect: Callable[[str, dict | None], bool]  # (url, storage_options) -> handles it?
    inspect: Callable[[str, argparse.Namespace], dict[str, Any]]


# -- printing: nested records as `key: value` lines, so new lineage keys show without new code

def _short(value: Any, width: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _flat(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Small dicts (<= 4 keys) become dotted keys; bigger ones stay one compact value."""
    items = []
    for key, value in record.items():
        if isinstance(value, dict) and 0 < len(value) <= 4:
            items.extend(_flat(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def print_fields(title: str, record: dict[str, Any] | None, skip: tuple[str, ...] = ()) -> None:
    print(f"  {title}:" + ("" if record else " (none recorded)"))
    for key, value in _flat({k: v for k, v in (record or {}).items() if k not in skip}):
        print(f"    {key}: {_short(value)}")


# -- shards

def _is_shards(url: str, storage_options: dict | None) -> bool:
    from tokenmill.pipeline.runtime.storage import filesystem, join

    if url.endswith((".tar", "manifest.json")):
        return True
    fs, path = filesystem(url, storage_options)
    return fs.isdir(path) and (fs.isfile(join(path, "manifest.json")) or bool(fs.glob(join(path, "*.tar"))))


def inspect_shards(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Counts, splits, formats, image statistics, source and seed; with --verify every shard is
    re-read: sha256 and count against the manifest, every member decoded, problems listed by key."""
    from tokenmill.pipeline.shards.verify import inspect_shards as describe

    result = describe(url, args.storage_options, args.verify)
    print(f"{url}: {result['shards']} shards, {result['samples']} samples")
    for split, s in result["splits"].items():
        print(f"  {split}: {s['samples']} samples in {s['shards']} shards")
    stats = result["image_stats"]
    print(f"  formats {result['formats']}; size h {stats['height']} w {stats['width']}; "
          f"channels {stats['channels']}; mean {stats['mean']} std {stats['std']}")
    settings = dict(result["settings"] or {})
    if result["source"] is not None or settings:  # a bare .tar or a manifest from `shard index` has fewer
        print(f"  source {result['source']}; seed {settings.pop('seed', '?')}, shuffle {settings.pop('shuffle', '?')}")
        settings.pop("source", None)
        print(f"  settings: {_short(settings, 300)}")
    if args.verify:
        problems = result["problems"]
        print(f"  verify: {'OK' if not problems else f'{len(problems)} problems'}")
        for p in problems:
            print(f"    {p['shard']} key={p['key'] or '-'}: {p['reason']}")
    return result


# -- token store

def _is_token_store(url: str, storage_options: dict | None) -> bool:
    from tokenmill.pipeline.runtime.storage import filesystem, join

    fs, path = filesystem(url, storage_options)
    return fs.isfile(join(path, "zarr.json"))


def inspect_token_store(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Rows per split, levels, completeness, every array's shape and chunking, the lineage (every
    key it records) and codebook statistics."""
    from tokenmill.pipeline.tokens.store import describe_store

    result = describe_store(url, args.storage_options)
    lineage, summary = result["lineage"], result["summary"] or {}
    print(f"{url}: token store ({result['state']}), {result['input_shards']['finished']}/"
          f"{result['input_shards']['total']} input shards finished")
    print(f"  rows {summary.get('samples', '?')} {summary.get('splits', '')}; "
          f"levels {[spec['name'] for spec in result['levels']]}")
    print(f"  model {lineage.get('model_uri')} (weights sha256 {str(lineage.get('weights_sha256'))[:12]}…), "
          f"{lineage.get('mode')}")
    for name, array in result["arrays"].items():
        print(f"  {name}: shape {array['shape']} {array['dtype']} chunks {array['chunks']} shards {array['shards']}")
    print_fields("lineage", lineage)
    if summary.get("codebook"):
        print(f"  codebook: {_short(summary['codebook'], 600)}")
    print(f"  corrupt samples skipped: {len(result['corrupt'])}")
    return result


# -- models and priors

def _is_model(url: str, storage_options: dict | None) -> bool:
    from tokenmill.pipeline.registry.model_info import is_model_reference
    from tokenmill.pipeline.runtime.storage import filesystem, join

    if is_model_reference(url):
        return True
    fs, path = filesystem(url, storage_options)
    return fs.isfile(join(path, "config.json"))


def inspect_model(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Class, kind, config, parameters, weights sha256 and origin; a prior's layout and lineage too."""
    from tokenmill.pipeline.registry.model_info import describe_model

    result = describe_model(url, args.tracking_uri, args.storage_options)
    print(f"{url}: {result['kind']} {result['class']} ({result['model_kind']}), {result['parameters']:,} parameters")
    print(f"  weights sha256 {result['weights_sha256']} ({result['weights_bytes']:,} bytes)")
    print(f"  config: {_short(result['config'], 300)}")
    if result.get("tokens"):
        print(f"  tokens: {_short(result['tokens'])}")
    print_fields("origin", result["origin"])
    if result["extra"]:
        print_fields("extra", result["extra"])
    if "prior" in result:
        print_prior(result["prior"])
    return result


def print_prior(prior: dict[str, Any]) -> None:
    scales = f", scales {prior['scales']}" if "scales" in prior else ""
    print(f"  prior: {prior['kind']}, vocabulary {prior['vocab_size']} ({prior['codebook_size']} codes, "
          f"{prior['num_classes']} classes), grid {prior['grid']}{scales}, {prior['seq_len']} tokens per sample")
    print(f"  store {prior['store']}; tokenizer {prior['tokenizer']}")
    print_fields("lineage", prior["lineage"], skip=("store_url", "tokenizer_uri"))


# First match wins.
INSPECTORS = [Inspector("shards", _is_shards, inspect_shards),
              Inspector("token_store", _is_token_store, inspect_token_store),
              Inspector("model", _is_model, inspect_model)]


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, json_object

    parser = subparsers.add_parser(
        "inspect", help="what an artifact (shards, token store, model, prior) holds and was made from",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET",
                        help="shards, a token store, a model folder or URL, runs:/…, models:/…, diffusers:PATH")
    parser.add_argument("--verify", action="store_true", help="shards: re-read everything; list corrupt members by key")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="fsspec storage options as JSON")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.registry.model_info import is_model_reference
    from tokenmill.pipeline.runtime.storage import filesystem

    if not is_model_reference(args.target):
        fs, path = filesystem(args.target, args.storage_options)
        if not fs.exists(path):
            raise UserError(f"{args.target} does not exist; check the path or URL")
    for inspector in INSPECTORS:
        if inspector.detect(args.target, args.storage_options):
            return {"kind": inspector.name, **inspector.inspect(args.target, args)}
    raise UserError(f"{args.target}: not something tokenmill can inspect (shards, a token store, a model or "
                    "prior folder, runs:/…, models:/…, diffusers:PATH); check the path")
