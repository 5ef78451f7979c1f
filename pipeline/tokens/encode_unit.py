"""One work unit of `tokenize`: read its input shards in turn, decode, encode, write their rows,
then the unit's marker.

A reader thread streams the tar and decodes images into batches while the caller's thread runs
the model on the previous batch (PIL and torch both release the GIL), so decoding overlaps
encoding and memory stays at a few batches plus one Zarr shard, whatever the shard's size.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from tokenmill.pipeline.runtime import faults
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.reader import good_samples, pixels_decoder, read_shard_threaded, sample_batches
from tokenmill.pipeline.tokens import store_code_stats
from tokenmill.pipeline.tokens.layout import WorkUnit
from tokenmill.pipeline.tokens.store import TokenStore

PREFETCH_BATCHES = 2


@dataclass
class Batch:
    images: np.ndarray  # (B, size, size, channels) uint8
    labels: np.ndarray  # (B,) int64, -1 when the sample has no `cls`
    keys: list[str]


@dataclass
class DecodedShard:
    """Batches of one shard in tar order; `corrupt` holds {"shard", "key", "reason"} of skipped samples."""

    url: str
    transform: TransformConfig
    batch_size: int
    storage_options: dict[str, Any]
    decode_threads: int = 1  # > 1: a thread pool decodes (GPU actors: keeps the device fed)
    corrupt: list[dict[str, str]] = field(default_factory=list)

    def batches(self) -> Iterator[Batch]:
        items = read_shard_threaded(self.url, pixels_decoder(self.transform), self.decode_threads, self.storage_options,
                                    window=max(self.batch_size, 64))
        for images, labels, keys in sample_batches(good_samples(items, self.corrupt), self.batch_size):
            yield Batch(images, labels, keys)


def prefetch(batches: Iterator[Batch], depth: int = PREFETCH_BATCHES) -> Iterator[Batch]:
    """Run `batches` in a thread, `depth` batches ahead; re-raises its exception here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                slots.put(batch)
            slots.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            slots.put(err)

    threading.Thread(target=produce, daemon=True, name="shard-decode").start()
    while (item := slots.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def encode_unit(
    unit: WorkUnit, store: TokenStore, rows_per_zarr_shard: int, encoder, batch_size: int,
    storage_options: dict[str, Any], worker: dict[str, str] | None = None, decode_threads: int = 1,
) -> list[dict[str, Any]]:
    """Encode every good sample of the unit's input shards into their rows, then write the
    unit's marker; returns each input shard's result (rows, corrupt, code_counts). `worker`
    (e.g. {"node": Ray node id}) is recorded in the marker."""
    writer = store.writer(unit, rows_per_zarr_shard, encoder.specs)
    results = []
    for shard in unit.shards:
        source = DecodedShard(shard.url, encoder.transform, batch_size, storage_options, decode_threads)
        counts = {s.name: np.zeros(s.codebook_size, dtype=np.int64) for s in encoder.specs if s.codebook_size}
        for batch in prefetch(source.batches()):
            rows = encoder.encode(batch.images, batch.labels, batch.keys)  # keys seed per-sample draws
            for name in counts:
                counts[name] += store_code_stats.count_codes(rows[name], len(counts[name]))
            writer.append({**rows, "keys": np.array(batch.keys, dtype=object), "labels": batch.labels})
        results.append({
            "rows": writer.end_shard(),
            "corrupt": source.corrupt,
            "code_counts": {name: store_code_stats.to_sparse(c) for name, c in counts.items()},
        })
    writer.close()
    faults.hit("tokenize.before_marker", unit=unit.index)  # tests: die at the worst moment
    store.write_marker(unit, results, worker)
    return results
