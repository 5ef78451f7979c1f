"""A prior's reads from a big remote store, in process: batches read ahead by a thread equal the
batches read in place (resumed too); the ranks of one node fetch each chunk from the store once
through the node's shared folder; a rewritten store is never served from it; the folder stays
bounded; the read-ahead thread ends on every way out (reader error, consumer error, early stop).

The store lives on `countmem://`, fsspec's in-memory filesystem under another name whose reads are
counted: a remote filesystem to TokenDataset (so the node cache is on), shared by the threads
that stand in for ranks."""

from __future__ import annotations

import collections
import threading

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from helpers.tokens import build_store

from tokenmill.pipeline.prior import data as prior_data
from tokenmill.pipeline.prior.config import PriorDataSection
from tokenmill.pipeline.tokens.dataset import TokenDataset
from tokenmill.pipeline.tokens.node_cache import NodeChunkCache
from tokenmill.pipeline.tokens.prefetch import prefetch

COUNTS = [9] * 7 + [5]  # 8 input shards, one chunk each: 68 train items


class CountingMemoryFS(MemoryFileSystem):
    """The memory filesystem, counting whole and ranged reads per path."""

    protocol = ("countmem",)
    reads: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def cat_file(self, path, start=None, end=None, **kwargs):
        with self.lock:
            self.reads[self._strip_protocol(path)] += 1
        return super().cat_file(path, start, end, **kwargs)


fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)


def _store(name: str, seed: int = 0) -> str:
    url = f"countmem://prior-reads/{name}.zarr"
    fs = fsspec.filesystem("countmem")
    if fs.exists(url):
        fs.rm(url, recursive=True)
    build_store(url, COUNTS, ["train"] * len(COUNTS), seed=seed)
    return url


def _chunk_reads() -> collections.Counter:
    return collections.Counter({p: n for p, n in CountingMemoryFS.reads.items() if "/codes/c/" in p})


def _section(url: str, folder, **extra) -> PriorDataSection:
    return PriorDataSection(store=url, cache_mb=1e-6, node_cache_dir=str(folder), **extra)  # every chunk streams


def test_prefetched_batches_equal_batches_read_in_place_resumed_too(tmp_path):
    dataset = prior_data.open_split(_section(_store("order"), tmp_path), "train", 7)
    assert not dataset.resident and dataset.node_cache is not None
    plain = prior_data.TrainBatches(dataset, "train", 1, 2, 4, seed=0, window_chunks=2)
    ahead = prior_data.TrainBatches(dataset, "train", 1, 2, 4, seed=0, window_chunks=2, prefetch_batches=3)
    for epoch, start in ((0, 0), (1, 0), (1, 3)):  # (1, 3): a run resumed at batch 3 of epoch 1
        expected = [(i, b["indices"].tolist(), b["tokens"]) for i, b in plain.epoch(epoch, start)]
        got = [(i, b["indices"].tolist(), b["tokens"]) for i, b in ahead.epoch(epoch, start)]
        assert [g[:2] for g in got] == [e[:2] for e in expected] and len(got) == 8 - start
        assert all(np.array_equal(g[2], e[2]) for g, e in zip(got, expected))
    assert not _threads("prior-batches")


def test_two_ranks_of_a_node_fetch_each_chunk_from_the_store_once(tmp_path):
    url = _store("shared")
    CountingMemoryFS.reads.clear()
    alone = prior_data.open_split(_section(url, tmp_path / "alone"), "train", 7)
    expected = alone.batch(np.arange(len(alone)))["tokens"]  # every chunk, one reader
    once = _chunk_reads()
    assert len(once) == len(COUNTS)

    CountingMemoryFS.reads.clear()
    ranks = [prior_data.open_split(_section(url, tmp_path / "node"), "train", 7) for _ in range(2)]
    got = [None, None]

    def read(rank: int) -> None:  # each rank reads every item, in its own order
        order = np.random.default_rng(rank).permutation(len(expected))
        got[rank] = ranks[rank].batch(order)["tokens"][np.argsort(order)]

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(g, expected) for g in got)
    assert _chunk_reads() == once  # two ranks, each chunk fetched as often as by one reader


def test_a_rewritten_store_is_not_served_from_the_node_cache(tmp_path):
    url = _store("rewritten")
    first = prior_data.open_split(_section(url, tmp_path), "train", 7).batch(np.arange(20))["tokens"]
    url = _store("rewritten", seed=1)  # the same URL, other codes
    CountingMemoryFS.reads.clear()
    again = prior_data.open_split(_section(url, tmp_path), "train", 7).batch(np.arange(20))["tokens"]
    assert _chunk_reads() and not np.array_equal(again, first)
    np.testing.assert_array_equal(again, TokenDataset(url, "train", add_bos=True, class_token=True,
                                                      num_classes=7).batch(np.arange(20))["tokens"])


def test_the_node_folder_stays_within_its_budget(tmp_path):
    cache = NodeChunkCache(str(tmp_path), budget_bytes=64 * 1024)
    block = np.zeros((1024, 4), np.uint16)  # 8 KiB (+ header) per chunk: 40 of them overflow the budget
    for chunk in range(40):
        cache.get(f"k-{chunk}", lambda: block)
    held = sum(p.stat().st_size for p in tmp_path.glob("*.npy"))
    assert 0 < held <= 64 * 1024 * 9 // 8
    assert (tmp_path / "k-39.npy").exists() and not (tmp_path / "k-0.npy").exists()  # the oldest went first


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_the_read_ahead_thread_ends_on_reader_error_consumer_error_and_early_stop():
    def reader(fail_at: int | None):
        for i in range(100):
            if i == fail_at:
                raise OSError("the store went away")
            yield i

    with pytest.raises(OSError, match="went away"):  # the reader's error, raised in the consumer
        list(prefetch(reader(5), 2, name="read-ahead-test"))
    assert not _threads("read-ahead-test")

    def consume() -> None:
        for i in prefetch(reader(None), 2, name="read-ahead-test"):
            if i == 3:
                raise ValueError("the step failed")

    try:
        consume()
    except ValueError:
        pass  # the traceback (and the iterator it holds) is freed here
    assert not _threads("read-ahead-test")

    items = prefetch(reader(None), 2, name="read-ahead-test")
    assert [next(items) for _ in range(3)] == [0, 1, 2]  # the producer is blocked on a full queue now
    items.close()
    assert not _threads("read-ahead-test")
