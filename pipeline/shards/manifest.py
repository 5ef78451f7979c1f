"""`manifest.json`: what a folder of WebDataset shards holds, and whether it still holds it.

The manifest sits next to the shards (`DEST/manifest.json`) and lists every *complete* shard:

    {"format": "webdataset", "version": 1, "source": ..., "settings": {...}, "classes": [...],
     "shards": [{"url": "train-000000.tar", "split": "train", "count": 1000, "bytes": ...,
                 "sha256": ..., "formats": {"png": 1000}, "first_key": ..., "last_key": ...,
                 "stats": {...}}, ...],
     # derived from "shards" by `finalize`:
     "samples": N, "splits": {"train": {"shards": 9, "samples": 4500}, ...},
     "formats": {"png": N}, "image_stats": {"count", "channels", "height", "width", "mean", "std"}}

Shard `url`s are relative to the manifest's folder (absolute URLs are allowed too).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.storage import filesystem, join
from tokenmill.pipeline.shards.images import native_pixels
from tokenmill.pipeline.shards.problems import BAD_CLS, BAD_JSON, ShardError
from tokenmill.pipeline.shards.reader import ShardSample, read_samples
from tokenmill.pipeline.shards.wds_io import HashingReader

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
# Pixel limit when the indexer and verifier decode images at their original size.
SCAN_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold


@dataclass
class ImageStats:
    """Mergeable running statistics of stored images: sizes, channel counts and per-channel
    mean/std of pixel values in [0, 1] (grey images count as R = G = B)."""

    count: int = 0
    pixels: int = 0
    total: list[float] = field(default_factory=lambda: [0.0] * 3)
    total_sq: list[float] = field(default_factory=lambda: [0.0] * 3)
    channels: dict[str, int] = field(default_factory=dict)  # "1" / "3" -> images
    height: list[int] = field(default_factory=list)  # [min, max]
    width: list[int] = field(default_factory=list)

    def add(self, pixels: np.ndarray) -> None:
        """One uint8 (H, W, C) image, C in 1, 3."""
        h, w, c = pixels.shape
        values = pixels.reshape(-1, c).astype(np.float64) / 255.0
        total, total_sq = values.sum(0), np.square(values).sum(0)
        for i in range(3):
            self.total[i] += float(total[min(i, c - 1)])
            self.total_sq[i] += float(total_sq[min(i, c - 1)])
        self.count += 1
        self.pixels += h * w
        self.channels[str(c)] = self.channels.get(str(c), 0) + 1
        self.height = [min(self.height[0], h), max(self.height[1], h)] if self.height else [h, h]
        self.width = [min(self.width[0], w), max(self.width[1], w)] if self.width else [w, w]

    def merge(self, other: "ImageStats") -> None:
        self.count += other.count
        self.pixels += other.pixels
        self.total = [a + b for a, b in zip(self.total, other.total)]
        self.total_sq = [a + b for a, b in zip(self.total_sq, other.total_sq)]
        for c, n in other.channels.items():
            self.channels[c] = self.channels.get(c, 0) + n
        for name in ("height", "width"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs:
                setattr(self, name, [min(mine[0], theirs[0]), max(mine[1], theirs[1])] if mine else list(theirs))

    def to_json(self) -> dict[str, Any]:
        return dict(count=self.count, pixels=self.pixels, total=self.total, total_sq=self.total_sq,
                    channels=self.channels, height=self.height, width=self.width)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ImageStats":
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """Counts, size range and per-channel mean/std (one channel when every image is grey)."""
        n = max(self.pixels, 1)
        mean = [t / n for t in self.total]
        std = [max(sq / n - m * m, 0.0) ** 0.5 for sq, m in zip(self.total_sq, mean)]
        keep = 1 if set(self.channels) == {"1"} else 3
        return dict(count=self.count, channels=self.channels, height=self.height, width=self.width,
                    mean=[round(m, 5) for m in mean[:keep]], std=[round(s, 5) for s in std[:keep]])


# -- reading and writing ------------------------------------------------------------------------

def manifest_url(url: str) -> str:
    """The manifest of a shard folder (or `url` itself when it names a .json file)."""
    return url if url.endswith(".json") else join(url, MANIFEST_NAME)


def read_manifest(url: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The manifest of folder/manifest `url`, or None when there is none."""
    fs, path = filesystem(manifest_url(url), storage_options)
    try:
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise UserError(f"{url} is a file, not a folder of shards") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{manifest_url(url)} is not valid JSON ({err}); delete it and rerun") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{manifest_url(url)} is not a shard manifest (no `shards` list); delete it and rerun")
    return manifest


def finalize(manifest: dict[str, Any]) -> dict[str, Any]:
    """Recompute the derived totals (samples, splits, formats, image_stats) from `shards`."""
    shards = manifest["shards"]
    stats, formats = ImageStats(), {}
    splits = {split: {"shards": 0, "samples": 0} for split in sorted({s["split"] for s in shards})}
    for shard in shards:
        splits[shard["split"]]["shards"] += 1
        splits[shard["split"]]["samples"] += shard["count"]
        stats.merge(ImageStats.from_json(shard["stats"]))
        for fmt, n in shard["formats"].items():
            formats[fmt] = formats.get(fmt, 0) + n
    manifest.update(samples=sum(s["count"] for s in shards), splits=splits, formats=formats,
                    image_stats=stats.summary())
    return manifest


def write_manifest(folder: str, manifest: dict[str, Any], storage_options: dict | None = None) -> None:
    """Write `finalize(manifest)` to `folder/manifest.json` atomically (temp name, then move),
    so a reader never sees a half-written manifest."""
    fs, path = filesystem(manifest_url(folder), storage_options)
    temp = f"{path}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temp, (json.dumps(finalize(manifest), indent=1) + "\n").encode())
    fs.mv(temp, path)


def manifest_identity(manifest: dict[str, Any]) -> str:
    """The sha256 that names a dataset's contents: each listed shard's url, split, count and
    sha256, in manifest order. Totals, statistics and settings are left out (derived or
    descriptive), so a rewritten manifest of the same shards keeps its identity."""
    identity = [[s["url"], s["split"], s["count"], s["sha256"]] for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def shard_urls(url: str, split: str | None = None, storage_options: dict | None = None) -> list[str]:
    """Absolute URLs of the shards a manifest lists (all, or one split), in manifest order."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise UserError(f"no manifest at {manifest_url(url)}; run `tokenmill shard index {url}` first")
    folder = manifest_url(url).rsplit("/", 1)[0]
    return [join(folder, s["url"]) for s in manifest["shards"] if split is None or s["split"] == split]


def shards_for_split(manifest: str, split: str, storage_options: dict | None = None) -> list[str]:
    """Absolute URLs of the `split` ("train" or "val") shards listed by a manifest (URL of the
    folder or of manifest.json). UserError when the split has no shards."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    urls = shard_urls(manifest, split, storage_options)
    if not urls:
        raise UserError(f"{manifest_url(manifest)} lists no {split} shards")
    return urls


# -- scanning existing shards -------------------------------------------------------------------

@dataclass
class ShardScan:
    entry: dict[str, Any]  # a manifest shard entry (url as given)
    problems: list[dict[str, str]]  # {"shard", "key", "reason"}


def scan_shard(url: str, storage_options: dict | None = None, split: str = "train") -> ShardScan:
    """Read one shard end to end: sha256 and bytes of the file, samples with an image (decodable
    or not), formats, image statistics, and every sample whose image does not decode (at its
    original size), whose `cls` is not an int or `json` not JSON, without an image, or damage."""
    fs, path = filesystem(url, storage_options)
    stats, formats, problems, keys = ImageStats(), {}, [], []

    def decode(key: str, ext: str, data: bytes) -> np.ndarray:
        keys.append(key)
        formats[ext] = formats.get(ext, 0) + 1
        return native_pixels(data, SCAN_MAX_PIXELS)

    with fs.open(path, "rb") as raw:
        reader = HashingReader(raw)
        for item in read_samples(reader, url, decode):
            if isinstance(item, ShardError):
                problems.append(item.as_dict())
                continue
            stats.add(item.pixels)
            problems.extend(e.as_dict() for e in _metadata_errors(url, item))
        reader.drain()
    entry = dict(url=url, split=split, count=len(keys), bytes=reader.bytes, sha256=reader.sha256.hexdigest(),
                 formats=formats, first_key=keys[0] if keys else "", last_key=keys[-1] if keys else "",
                 stats=stats.to_json())
    return ShardScan(entry, problems)


def _metadata_errors(url: str, sample: ShardSample) -> Iterator[ShardError]:
    if "cls" in sample.members and sample.label < 0:
        yield ShardError(url, sample.key, BAD_CLS)
    if "json" in sample.members:
        try:
            json.loads(sample.members["json"])
        except (ValueError, UnicodeDecodeError):
            yield ShardError(url, sample.key, BAD_JSON)


def guess_split(name: str) -> str:
    """`val` for shard names that say val/valid/validation/test, else `train`."""
    return "val" if re.search(r"(^|[^a-z])(val|valid|validation|test)([^a-z]|$)", name.lower()) else "train"


def index_shards(url: str, storage_options: dict | None = None, split: str | None = None,
                 progress: bool = True) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A manifest for the existing `*.tar` shards under folder `url` (e.g. img2dataset output),
    built by scanning each one; returns (manifest, problems). `split` forces one split for all
    shards, else it is guessed from each shard's name."""
    from tqdm import tqdm

    fs, root = filesystem(url, storage_options)
    if not fs.isdir(root):
        raise UserError(f"{url} is not a folder of shards")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    if not names:
        raise UserError(f"{url} holds no .tar shards")
    shards, problems = [], []
    for name in tqdm(names, desc="index", unit="shard", disable=not progress):
        scan = scan_shard(join(url, name), storage_options, split or guess_split(name))
        scan.entry["url"] = name
        shards.append(scan.entry)
        problems.extend(scan.problems)
    if not any(s["count"] for s in shards):  # e.g. files named .tar that are not tar archives
        first = problems[0] if problems else dict(shard=join(url, names[0]), reason="no samples")
        raise UserError(f"{url}: none of its {len(names)} .tar shards holds a readable sample "
                        f"(e.g. {first['shard']}: {first['reason']})")
    manifest = dict(format="webdataset", version=1, source=url, settings={"indexed": True}, classes=None,
                    shards=shards)
    return finalize(manifest), problems
