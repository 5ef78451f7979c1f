"""Streaming WebDataset shards through Ray Data into fixed-size training batches.

Shared by training and tokenization:

    urls = shards_for_split("s3://bucket/mnist/", "train")       # pipeline.shards.manifest
    stream = open_stream(urls, StreamConfig(transform=TransformConfig(size=32, channels=1)), epoch=e)
    for batch in stream.dataset.iter_batches(batch_size=64):
        x, y = to_model_input(batch)                             # (B, C, H, W) float32 in [0, 1], (B,) int64
    stream.report()  # {"skipped": n, "by_reason": {...}, "errors": [{"shard", "key", "reason"}, ...]}

Training hands one dataset to Ray Train, which re-executes it for every pass; such a stream is
opened with `epoch=EPOCH_CLOCK` and each pass reads the epoch from `stream.epoch_clock`, which
the training loop sets (from its checkpointed counter) before the pass begins.

Rows: `image` uint8 (size, size, channels), `label` int64 (-1 if none), `key` str, `shard` str.

The pipeline, per shard (one Ray task per shard, so a damaged shard costs only itself):
    shard URL --pipeline.shards.reader (tar, group by key, decode + transform)--> decoded samples
      --seeded buffer shuffle--> decoded samples --`batch_rows` at a time--> numpy batches
Bad input never raises inside Ray: an undecodable sample, a sample without an image, an empty
or damaged tar is skipped and recorded with its key and shard in a small `ErrorLog` actor
(called only when there is something to record); `ShardStream.report()` reads it.
"""

from __future__ import annotations

import random
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pydantic
import ray

from tokenmill.models.errors import UserError
from tokenmill.pipeline.config import StrictModel
from tokenmill.pipeline.runtime.storage import filesystem
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.manifest import read_manifest
from tokenmill.pipeline.shards.problems import NO_IMAGE, ShardError, kind_of
from tokenmill.pipeline.shards.reader import good_samples, pixels_decoder, read_shard, sample_batches

if TYPE_CHECKING:
    import torch


class StreamConfig(StrictModel):
    transform: TransformConfig = TransformConfig()
    shuffle: bool = True  # shard order per epoch + a sample buffer per shard, seeded
    shuffle_buffer: int = pydantic.Field(1000, ge=0)  # decoded samples; 0 keeps shard order inside a shard
    seed: int = 0
    batch_rows: int = pydantic.Field(512, ge=1)  # rows per output block
    ordered: bool = True  # deterministic row order (Ray Data preserve_order)


# -- checks before any Ray work -----------------------------------------------------------------

def check_shards(urls: list[str], storage_options: dict | None = None) -> None:
    """One UserError naming the URL for: an empty list, a missing shard, a shard without images
    (by its folder's manifest when it lists the shard, else by reading tar headers up to the
    first image member). Damaged/empty tar files are left to the stream, which reports them."""
    if not urls:
        raise UserError("no shards to read: the shard list is empty")
    listings: dict[str, set[str]] = {}
    manifests: dict[str, dict[str, int]] = {}
    for url in urls:
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        fs, path = filesystem(url, storage_options)
        if folder not in listings:
            parent = path.rsplit("/", 1)[0] if "/" in path else "."
            try:
                listings[folder] = {p.rstrip("/") for p in fs.ls(parent, detail=False)}
            except FileNotFoundError:
                listings[folder] = set()
            manifest = read_manifest(folder, storage_options) or {"shards": []}
            manifests[folder] = {s["url"]: s["count"] for s in manifest["shards"]}
        if path not in listings[folder] and not fs.isfile(path):
            raise UserError(f"shard {url} does not exist")
        count = manifests[folder].get(name)
        if count == 0 or (count is None and not _has_image(url, storage_options)):
            raise UserError(f"shard {url} contains no images")


def _has_image(url: str, storage_options: dict | None) -> bool:
    """Whether the shard at `url` has an image member (reads only up to the first one, without
    decoding it); True for damaged tars, which the stream reports instead."""
    with closing(read_shard(url, None, storage_options)) as items:  # closes the file on an early return
        for item in items:
            if not isinstance(item, ShardError) or item.reason != NO_IMAGE:
                return True
    return False


# -- shuffling ----------------------------------------------------------------------------------

def shard_order(urls: list[str], seed: int, epoch: int, shuffle: bool = True) -> list[str]:
    """The shard order of one epoch: a seeded permutation (or `urls` as given). Every read task
    of a pass computes it, so it is numpy's O(n) permutation (~1 ms for 100k shards)."""
    if not shuffle:
        return list(urls)
    return [urls[i] for i in np.random.default_rng([seed % 2**64, epoch]).permutation(len(urls))]


def buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """webdataset-style local shuffle: keep up to `size` items, emit a random one per new item."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# -- one shard, usable without Ray (the tokenizer's work unit) -----------------------------------

def iter_shard_batches(
    url: str,
    config: StreamConfig,
    errors: list[dict[str, str]],
    *,
    epoch: int = 0,
    storage_options: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of up to `config.batch_rows` rows from one shard; every skipped sample
    or damage is appended to `errors` as {"shard", "key", "reason"} before the batch after it."""
    decode = pixels_decoder(config.transform, config.seed, epoch)
    samples = good_samples(read_shard(url, decode, storage_options), errors)
    # now: decoded samples in archive order; damaged / image-less / undecodable samples in `errors`
    if config.shuffle and config.shuffle_buffer > 1:
        samples = buffer_shuffle(samples, config.shuffle_buffer, random.Random(f"{config.seed}:{epoch}:{url}"))
    # now: the same samples, locally shuffled under (seed, epoch, shard)
    for images, labels, keys in sample_batches(samples, config.batch_rows):
        yield {"image": images, "label": labels, "key": np.asarray(keys, dtype=object),
               "shard": np.full(len(keys), url, dtype=object)}


# -- the Ray stream -----------------------------------------------------------------------------

@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch that the next pass over a training stream reads. Every rank sets the same value
    before it starts a pass; Ray Train's split coordinator starts a pass only once every rank has
    asked for it, so all read tasks of one pass see one epoch."""

    def __init__(self):
        self.epoch = 0

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


EPOCH_CLOCK = "clock"  # open_stream(epoch=EPOCH_CLOCK): each pass reads its epoch from an EpochClock


@ray.remote(num_cpus=0)
class ErrorLog:
    """Collects skipped samples from every read task; duplicates (a re-read epoch) count once."""

    def __init__(self):
        self.records: dict[tuple[str, str, str], dict[str, str]] = {}

    def add(self, records: list[dict[str, str]]) -> None:
        for record in records:
            self.records.setdefault((record["shard"], record["key"], record["reason"]), record)

    def all(self) -> list[dict[str, str]]:
        return list(self.records.values())


def _read_shards(batch: dict[str, np.ndarray], urls: list[str], config: StreamConfig, epoch: int,
                 clock, storage_options: dict | None, log) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: positions in the epoch's shard order -> decoded batches of those shards;
    errors reach `log` before each batch. `clock` (when given) supplies the epoch of this pass."""
    if clock is not None:
        epoch = ray.get(clock.get.remote())
    order = shard_order(urls, config.seed, epoch, config.shuffle)
    for position in batch["position"]:
        url = order[position]
        errors: list[dict[str, str]] = []
        for out in iter_shard_batches(str(url), config, errors, epoch=epoch, storage_options=storage_options):
            if errors:
                ray.get(log.add.remote(errors))  # synchronous: recorded before the rows are seen
                errors.clear()
            if len(out["key"]):
                yield out
        if errors:
            ray.get(log.add.remote(errors))


@dataclass
class ShardStream:
    dataset: "ray.data.Dataset"  # rows: image uint8 (H, W, C), label int64, key str, shard str
    log: Any  # ErrorLog actor handle
    epoch_clock: Any = None  # EpochClock actor handle when opened with epoch=EPOCH_CLOCK

    def errors(self) -> list[dict[str, str]]:
        """Every sample skipped so far: {"shard", "key", "reason"} (complete once iterated)."""
        return sorted(ray.get(self.log.all.remote()), key=lambda r: (r["shard"], r["key"], r["reason"]))

    def report(self) -> dict[str, Any]:
        return skip_report(self.errors())


def skip_report(errors: list[dict[str, str]]) -> dict[str, Any]:
    """{"skipped": n, "by_reason": {reason kind: n}, "errors": [...]} for job summaries."""
    kinds = Counter(kind_of(r["reason"]) for r in errors)
    return dict(skipped=len(errors), by_reason=dict(sorted(kinds.items())), errors=errors)


def open_stream(urls: list[str], config: StreamConfig | None = None, *, epoch: int | str = 0,
                storage_options: dict | None = None) -> ShardStream:
    """A Ray Dataset of decoded rows from shard `urls` (after `check_shards`, which raises a
    UserError before any Ray work); shard order, local shuffle and random augmentation depend on
    (seed, epoch). With `epoch=EPOCH_CLOCK` every pass reads its epoch from `stream.epoch_clock`."""
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    config = config or StreamConfig()
    check_shards(urls, storage_options)
    # On the driver's node: they live as long as the job, whichever worker node is lost meanwhile.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    clock = EpochClock.options(scheduling_strategy=here).remote() if epoch == EPOCH_CLOCK else None
    log = ErrorLog.options(scheduling_strategy=here).remote()
    dataset = ray.data.from_items([{"position": i} for i in range(len(urls))], override_num_blocks=len(urls))
    # now: one block per position in the epoch's shard order (the read task maps it to a URL)
    dataset = dataset.map_batches(
        _read_shards, batch_size=1, batch_format="numpy",
        fn_kwargs=dict(urls=list(urls), config=config, epoch=0 if clock else epoch, clock=clock,
                       storage_options=storage_options, log=log),
    )
    # now: rows image (size, size, C) uint8, label, key, shard; bad samples in `log`
    dataset.context.execution_options.preserve_order = config.ordered
    return ShardStream(dataset, log, clock)


def to_model_input(batch: dict[str, Any], device: Any = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A stream batch -> (x float32 (B, C, H, W) in [0, 1], y int64 (B,)), on `device` if given."""
    import torch

    images = batch["image"]
    if not torch.is_tensor(images):
        images = torch.from_numpy(np.require(images, np.uint8, requirements="W"))  # copies read-only blocks
    labels = torch.as_tensor(batch["label"], dtype=torch.int64)
    if device is not None:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
    return x, labels
