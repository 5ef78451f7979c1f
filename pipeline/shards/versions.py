"""Data versions: the sub-folders of a prefix that hold a complete shard manifest.

    s3://bucket/datasets/mnist/2025-06-01/manifest.json   <- version "2025-06-01"
    s3://bucket/datasets/mnist/2025-06-08/manifest.json   <- version "2025-06-08" (newest)

The newest version is the lexically greatest folder name: deterministic on every machine,
unlike modification times. A folder still being written by `tokenmill shard` (its manifest
says `"complete": false`) or without a manifest yet is not a version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.storage import filesystem, join
from tokenmill.pipeline.shards.manifest import manifest_identity, read_manifest

# Version names end up in MLflow tag keys and store URLs: keep them to a portable alphabet.
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class DataVersion:
    name: str
    url: str  # the shard folder, for `data.shards` and `tokenize --data`
    manifest_identity: str  # pipeline.shards.manifest.manifest_identity


def newest_version(prefix: str, storage_options: dict | None = None) -> DataVersion:
    """The newest complete data version under `prefix`; UserError when there is none."""
    fs, root = filesystem(prefix, storage_options)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        raise UserError(f"versions.prefix {prefix} does not exist") from None
    names = sorted((e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"),
                   reverse=True)
    for name in filter(VERSION_NAME.match, names):
        url = join(prefix, name)
        manifest = read_manifest(url, storage_options)
        if manifest is not None and manifest.get("complete", True) and manifest.get("shards"):
            return DataVersion(name, url, manifest_identity(manifest))
    raise UserError(f"no data version under {prefix}: expected sub-folders (e.g. 2025-06-01/) with a complete "
                    "manifest.json written by `tokenmill shard`")
