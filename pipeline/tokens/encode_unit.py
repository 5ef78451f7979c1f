"""One work unit of `tokenize`: read its input shards, decode, encode, write their rows, then
the unit's marker. Three stages run at once, each on its own thread, joined by bounded queues:

    read + decode   (`unit_batches` in a `prefetch` thread; decode threads from `read_shards_threaded`):
                    one continuous read-ahead over all the unit's input shards, no stall at a
                    shard boundary -> Batch ... ShardEnd, Batch ... ShardEnd
    encode          (the caller's thread): launches batch i+1 (`start_encode`: pinned,
                    non-blocking copies on CUDA) before batch i's rows are read
    write           (`UnitWriter`'s thread): reads batch i's rows, counts codes, writes whole
                    Zarr shards; `close()` waits for every write

The marker (the commit) is written only after the writer has closed the region, so a unit is
exactly once and resumable as before. Memory stays at a few batches plus one Zarr shard,
whatever the shard's size.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from tokenmill.pipeline.runtime import faults
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.reader import good_samples, pixels_decoder, read_shards_threaded, sample_batches
from tokenmill.pipeline.tokens.encoder import start_encode
from tokenmill.pipeline.tokens.layout import WorkUnit
from tokenmill.pipeline.tokens.store import TokenStore
from tokenmill.pipeline.tokens.unit_writer import UnitWriter

PREFETCH_BATCHES = 2


@dataclass
class Batch:
    images: np.ndarray  # (B, size, size, channels) uint8
    labels: np.ndarray  # (B,) int64, -1 when the sample has no `cls`
    keys: list[str]


@dataclass
class ShardEnd:
    """Every batch of an input shard came before this; `corrupt`: its skipped samples
    ({"shard", "key", "reason"})."""

    corrupt: list[dict[str, str]]


def unit_batches(urls: list[str], transform: TransformConfig, batch_size: int, storage_options: dict[str, Any],
                 decode_threads: int = 1) -> Iterator[Batch | ShardEnd]:
    """Batches of each input shard in tar order (a batch never spans two shards), each shard
    closed by its ShardEnd (also a shard with no good sample)."""
    items = read_shards_threaded(urls, pixels_decoder(transform), decode_threads, storage_options,
                                 ahead=2 * max(batch_size, 64))
    ended = 0
    for position, group in itertools.groupby(items, key=lambda entry: entry[0]):
        for _ in range(ended, position):  # shards with no item at all (empty tars)
            yield ShardEnd([])
        corrupt: list[dict[str, str]] = []
        for images, labels, keys in sample_batches(good_samples((item for _, item in group), corrupt), batch_size):
            yield Batch(images, labels, keys)
        yield ShardEnd(corrupt)
        ended = position + 1
    for _ in range(ended, len(urls)):
        yield ShardEnd([])


def prefetch(items: Iterator, depth: int = PREFETCH_BATCHES) -> Iterator:
    """Run `items` in a thread, `depth` items ahead; re-raises its exception here. Closing this
    generator early (the consumer failed) stops and joins the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    break
            else:
                offer(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            offer(err)
        finally:
            getattr(items, "close", lambda: None)()  # ends the decode pool of an abandoned read

    thread = threading.Thread(target=produce, daemon=True, name="shard-decode")
    thread.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def encode_unit(
    unit: WorkUnit, store: TokenStore, rows_per_zarr_shard: int, encoder, batch_size: int,
    storage_options: dict[str, Any], worker: dict[str, str] | None = None, decode_threads: int = 1,
) -> list[dict[str, Any]]:
    """Encode every good sample of the unit's input shards into their rows, then write the
    unit's marker; returns each input shard's result (rows, corrupt, code_counts). `worker`
    (e.g. {"node": Ray node id}) is recorded in the marker."""
    writer = UnitWriter(store.writer(unit, rows_per_zarr_shard, encoder.specs), encoder.specs)
    batches = prefetch(unit_batches([s.url for s in unit.shards], encoder.transform, batch_size, storage_options,
                                    decode_threads))
    try:
        for item in batches:
            if isinstance(item, ShardEnd):
                writer.end_shard(item.corrupt)
            else:  # keys seed per-sample draws
                writer.put(start_encode(encoder, item.images, item.labels, item.keys), item.labels, item.keys)
        results = writer.close()
    finally:  # on an error: no thread of this unit keeps running, nothing is committed
        batches.close()
        writer.abort()
    faults.hit("tokenize.before_marker", unit=unit.index)  # tests: die at the worst moment
    store.write_marker(unit, results, worker)
    return results
