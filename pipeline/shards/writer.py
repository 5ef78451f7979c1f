"""`tokenmill shard SRC DEST`: write an image source as WebDataset tar shards + manifest.json.

Layout (img2dataset-compatible samples):  DEST/[prefix-]{train,val}-000000.tar, ..., manifest.json
    KEY.png|jpg|webp   the image (grey sources stay grey, everything else RGB)
    KEY.cls            the integer label (only when known)
    KEY.json           {"key", "source", "width", "height", "original_width", "original_height",
                        "status": "success", "label"[, "class"]}

Shuffled: each split's records are planned in a seeded order (sha1 of seed and key, the same on
every machine), so a class-sorted source (MNIST, a folder of class sub-folders) gives shards and
shuffle buffers that mix every class; `shuffle=False` keeps key order. `seed` is one of the
settings the manifest records.

Exactly once and resumable: a rerun plans the same order; a shard is written to `NAME.partial`, moved to `NAME`, and only then appended to the manifest, which is rewritten
atomically after every shard. A rerun starts after the last shard the manifest lists (each
entry records `plan_end`, its end in the planned order), so an interrupted run never counts a
half-written shard and never duplicates a sample. Tar members carry mtime 0, so a shard's bytes
(and sha256) depend only on its content.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from typing import Any, Literal

import numpy as np
import pydantic
import webdataset as wds
from PIL import Image

from tokenmill.models.errors import UserError
from tokenmill.pipeline.config import StrictModel
from tokenmill.pipeline.runtime.storage import filesystem, join
from tokenmill.pipeline.runtime.storage_retry import retry_storage
from tokenmill.pipeline.shards.images import DecodeError, to_8bit
from tokenmill.pipeline.shards.manifest import SPLITS, ImageStats, read_manifest, write_manifest
from tokenmill.pipeline.shards.sources import BUILTIN_SOURCES, ImageSource, open_source
from tokenmill.pipeline.shards.wds_io import HashingWriter


class ShardSettings(StrictModel):
    """Everything that decides shard contents; a rerun into the same DEST must use the same."""

    image_format: Literal["jpg", "png", "webp"] = "png"
    quality: int = pydantic.Field(95, ge=1, le=100)  # jpg / webp
    # Samples per shard; None: 10,000, or 1,000 for the small built-in sources (several shards,
    # so Ray Data reads them in parallel). The manifest records the resolved number.
    maxcount: int | None = pydantic.Field(None, ge=1)
    maxsize: int = pydantic.Field(1_000_000_000, ge=1)  # payload bytes per shard (webdataset semantics)
    val_fraction: float = pydantic.Field(0.1, ge=0.0, lt=1.0)  # ignored by sources with a fixed split
    prefix: str = pydantic.Field("", pattern=r"^[\w-]*$")
    class_from_subfolder: bool = False
    labels: str | None = None  # .npy of labels for a .npy source
    shuffle: bool = True  # False: samples in key order (class-sorted sources stay class-sorted)
    seed: int = 0  # of the shuffled order: the same seed and source give byte-identical shards


def split_of(key: str, val_fraction: float) -> str:
    """`val` for a stable `val_fraction` of keys (sha1 of the key, the same on every machine)."""
    position = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64
    return "val" if position < val_fraction else "train"


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix + '-' if prefix else ''}{split}-{index:06d}.tar"


def default_maxcount(src: str) -> int:
    return 1_000 if src in BUILTIN_SOURCES else 10_000


def shuffle_order(keys: list[str], records: list[int], seed: int) -> list[int]:
    """`records` sorted by sha1(seed, key): a seeded shuffle that depends on nothing but the
    seed and each key (no RNG implementation, no machine), so every rerun plans the same order."""
    salt = f"tokenmill-shuffle:{seed}:".encode()
    return sorted(records, key=lambda i: hashlib.sha1(salt + keys[i].encode()).digest())


def plan(source: ImageSource, settings: ShardSettings) -> dict[str, list[int]]:
    """Record indices of each split in the order shards are filled in: shuffled by
    `settings.seed`, or key order without `settings.shuffle`."""
    splits = source.fixed_split or [split_of(key, settings.val_fraction) for key in source.keys]
    planned = {split: [i for i, s in enumerate(splits) if s == split] for split in SPLITS}
    if settings.shuffle:
        planned = {split: shuffle_order(source.keys, records, settings.seed) for split, records in planned.items()}
    return planned


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 (H, W, C) -> image file bytes (C = 4 is composited onto white)."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    image = to_8bit(image)
    out = io.BytesIO()
    if image_format == "jpg":
        image.save(out, format="JPEG", quality=quality)
    elif image_format == "webp":
        image.save(out, format="WEBP", quality=quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def stored_pixels(pixels: np.ndarray) -> np.ndarray:
    """The (H, W, 1|3) pixels a shard stores for source pixels (H, W, 1|3|4)."""
    if pixels.shape[2] != 4:
        return pixels
    return np.asarray(to_8bit(Image.fromarray(pixels, "RGBA")))


class _ShardJob:
    """Writes the shards of one run; `skipped` collects source images that failed to load."""

    def __init__(self, source: ImageSource, dest: str, settings: ShardSettings, storage_options: dict | None):
        self.source, self.dest, self.settings = source, dest, settings
        self.storage_options = storage_options
        self.fs, self.root = filesystem(dest, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.skipped: list[dict[str, str]] = []

    def write_shard(self, name: str, split: str, records: list[int], start: int, progress) -> dict[str, Any]:
        """Fill `name.partial` from records[start:] until maxcount/maxsize, move it to `name`;
        returns its manifest entry (count 0 when every remaining record failed to load)."""
        settings, source = self.settings, self.source
        stats, keys, payload, end = ImageStats(), [], 0, start
        partial = join(self.root, name + ".partial")
        with self.fs.open(partial, "wb") as raw:
            out = HashingWriter(raw)
            with wds.TarWriter(out, encoder=False, mtime=0) as tar:
                while end < len(records) and len(keys) < settings.maxcount and payload < settings.maxsize:
                    i = records[end]
                    end += 1
                    progress.update()
                    try:
                        pixels = stored_pixels(source.load(i))
                    except DecodeError as err:
                        self.skipped.append(dict(key=source.keys[i], source=source.origins[i], reason=str(err)))
                        continue
                    payload += tar.write(self.sample(i, pixels))
                    stats.add(pixels)
                    keys.append(source.keys[i])
        entry = dict(url=name, split=split, count=len(keys), bytes=out.bytes, sha256=out.sha256.hexdigest(),
                     formats={settings.image_format: len(keys)}, first_key=keys[0] if keys else "",
                     last_key=keys[-1] if keys else "", plan_end=end, stats=stats.to_json())
        if keys:
            self.fs.mv(partial, join(self.root, name))
        else:
            self.fs.rm(partial)
        return entry

    def write_shard_retried(self, name: str, split: str, records: list[int], start: int, progress) -> dict[str, Any]:
        """`write_shard`, started again from the same record after a transient storage error
        (it rewrites `name.partial` whole); StorageError naming the shard otherwise."""
        skipped, shown = len(self.skipped), progress.n

        def attempt() -> dict[str, Any]:
            del self.skipped[skipped:]
            progress.n = shown
            return self.write_shard(name, split, records, start, progress)

        return retry_storage(attempt, what=f"writing shard {name}", url=join(self.dest, name))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        retry_storage(lambda: write_manifest(self.dest, manifest, self.storage_options),
                      what="writing the manifest", url=join(self.dest, "manifest.json"))

    def sample(self, i: int, pixels: np.ndarray) -> dict[str, Any]:
        source, label = self.source, int(self.source.labels[i])
        meta = dict(key=source.keys[i], source=source.origins[i], width=pixels.shape[1], height=pixels.shape[0],
                    original_width=pixels.shape[1], original_height=pixels.shape[0], status="success", label=label)
        if source.classes is not None and label >= 0:
            meta["class"] = source.classes[label]
        sample = {"__key__": source.keys[i],
                  self.settings.image_format: encode_image(pixels, self.settings.image_format, self.settings.quality),
                  "json": json.dumps(meta, sort_keys=True).encode()}
        if label >= 0:
            sample["cls"] = str(label).encode()
        return sample


def write_shards(src: str, dest: str, settings: ShardSettings | None = None,
                 storage_options: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Write (or finish writing) the shards of `src` under `dest`; returns a JSON-ready summary
    with the manifest URL, shards written now and skipped as already complete, and the source
    images that could not be read (key, source, reason)."""
    from tqdm import tqdm

    settings = settings or ShardSettings()
    if settings.maxcount is None:
        settings = settings.model_copy(update=dict(maxcount=default_maxcount(src)))
    source = open_source(src, class_from_subfolder=settings.class_from_subfolder, labels=settings.labels,
                         storage_options=storage_options)
    # now: source.keys sorted and unique; pixels not loaded yet; settings.maxcount resolved
    planned = plan(source, settings)
    fixed = dict(source=src, **settings.model_dump())
    manifest = read_manifest(dest, storage_options)
    if manifest is not None and manifest.get("settings") != fixed:
        changed = sorted(k for k in fixed if manifest.get("settings", {}).get(k) != fixed.get(k))
        raise UserError(f"{dest} already holds shards written with different settings ({', '.join(changed)}); "
                        "use another DEST or the same options")
    manifest = manifest or dict(format="webdataset", version=1, source=src, settings=fixed,
                                classes=source.classes, shards=[], complete=False)
    # now: manifest["shards"] lists exactly the committed shards, in order, per split
    job = _ShardJob(source, dest, settings, storage_options)
    resumed = len(manifest["shards"])
    done = {split: [s for s in manifest["shards"] if s["split"] == split] for split in SPLITS}
    starts = {split: done[split][-1]["plan_end"] if done[split] else 0 for split in SPLITS}
    bar = tqdm(total=len(source), initial=sum(starts.values()), desc=f"shard {dest}", unit="img",
               file=sys.stderr, disable=not progress)
    with bar:
        for split in SPLITS:
            records, start, index = planned[split], starts[split], len(done[split])
            while start < len(records):
                entry = job.write_shard_retried(shard_name(settings.prefix, split, index), split, records, start, bar)
                start, index = entry["plan_end"], index + 1
                if entry["count"]:
                    manifest["shards"].append(entry)
                    job.write_manifest(manifest)  # commit point of this shard
    manifest["complete"] = True
    job.write_manifest(manifest)
    return dict(dest=dest, manifest=join(dest, "manifest.json"), shards=len(manifest["shards"]),
                shards_written=len(manifest["shards"]) - resumed, shards_already_complete=resumed,
                samples=manifest["samples"], splits=manifest["splits"], image_stats=manifest["image_stats"],
                skipped=job.skipped)
