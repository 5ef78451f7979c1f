"""`tokenmill inspect SHARDS [--verify]`: what a folder of shards holds, and whether it is intact.

`inspect_shards(url, verify=True)` re-reads every shard through the shard reader: the file's
sha256 and sample count against the manifest, every image decoded at its original size,
`cls` / `json` members parsed. Problems are ShardError dicts {"shard", "key", "reason"}.
"""

from __future__ import annotations

from typing import Any

from tokenmill.pipeline.runtime.storage import join
from tokenmill.pipeline.shards.manifest import finalize, index_shards, manifest_url, read_manifest, scan_shard
from tokenmill.pipeline.shards.problems import COUNT_DIFFERS, SHA256_DIFFERS, SHARD_MISSING, ShardError, reason


def inspect_shards(url: str, storage_options: dict | None = None, verify: bool = False) -> dict[str, Any]:
    """Counts, splits, formats, image statistics and (from the manifest) source and writer settings
    of a shard folder, a manifest.json URL or one .tar URL; with `verify`, also `verified`, `ok` and
    `problems`."""
    if url.endswith(".tar"):
        manifest, problems = _one_tar(url, storage_options)
    else:
        manifest, problems = read_manifest(url, storage_options), None
        if manifest is None:  # a folder of shards without a manifest: scanning it is verifying it
            manifest, problems = index_shards(url, storage_options, progress=False)
    result = dict(target=url, manifest=None if url.endswith(".tar") else manifest_url(url),
                  shards=len(manifest["shards"]), samples=manifest["samples"], splits=manifest["splits"],
                  formats=manifest["formats"], image_stats=manifest["image_stats"],
                  source=manifest.get("source"), settings=manifest.get("settings"))  # settings: seed, split, format
    if verify:
        if problems is None:
            problems = verify_shards(manifest, manifest_url(url).rsplit("/", 1)[0], storage_options)
        result.update(verified=True, ok=not problems, problems=problems)
    return result


def verify_shards(manifest: dict[str, Any], folder: str, storage_options: dict | None = None) -> list[dict[str, str]]:
    """Re-read every shard `manifest` lists (URLs relative to `folder`); its problems."""
    problems: list[dict[str, str]] = []
    for shard in manifest["shards"]:
        url = join(folder, shard["url"])
        try:
            scan = scan_shard(url, storage_options, shard["split"])
        except FileNotFoundError:
            problems.append(ShardError(url, "", SHARD_MISSING).as_dict())
            continue
        problems.extend(scan.problems)
        problems.extend(_differences(url, scan.entry, shard))
    return problems


def _one_tar(url: str, storage_options: dict | None) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A manifest of the one shard `url` (its entry in its folder's manifest, if listed) and the
    problems of reading it, compared with that entry."""
    folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
    listed = {s["url"]: s for s in (read_manifest(folder, storage_options) or {"shards": []})["shards"]}
    scan = scan_shard(url, storage_options)
    scan.entry["url"] = name
    entry = listed.get(name, scan.entry)
    return finalize(dict(shards=[entry])), scan.problems + _differences(url, scan.entry, entry)


def _differences(url: str, scanned: dict[str, Any], listed: dict[str, Any]) -> list[dict[str, str]]:
    """Where a shard read now differs from its manifest entry (sha256, count)."""
    kinds = {"sha256": SHA256_DIFFERS, "count": COUNT_DIFFERS}
    return [ShardError(url, "", reason(kind, f"{scanned[field]} != {listed[field]}")).as_dict()
            for field, kind in kinds.items() if scanned[field] != listed[field]]
