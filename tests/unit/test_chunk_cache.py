"""ChunkCache: exact rows under eviction, least-recently-used eviction order, growth."""

from __future__ import annotations

import numpy as np

from tokenmill.pipeline.tokens.chunk_cache import ChunkCache

CHUNK_ROWS = 8


def _cache(data: np.ndarray, slots: int) -> tuple[ChunkCache, list[int]]:
    loaded: list[int] = []

    def load(chunk: int) -> np.ndarray:
        loaded.append(chunk)
        return data[chunk * CHUNK_ROWS : (chunk + 1) * CHUNK_ROWS]

    chunks = -(-len(data) // CHUNK_ROWS)
    return ChunkCache(load, chunks, CHUNK_ROWS, data.shape[1], data.dtype, slots), loaded


def _data(rows: int = 100) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 512, (rows, 5)).astype(np.uint16)  # last chunk: 4 rows


def test_random_batches_return_exact_rows_while_evicting():
    data = _data()
    cache, loaded = _cache(data, slots=3)
    rng = np.random.default_rng(1)
    for _ in range(200):
        rows = rng.integers(0, len(data), rng.integers(1, 4))
        np.testing.assert_array_equal(cache.gather(rows), data[rows])
    assert len(loaded) > 13  # 13 chunks through 3 slots: chunks were evicted and read again


def test_every_chunk_is_read_once_when_all_fit():
    data = _data()
    cache, loaded = _cache(data, slots=13)
    rng = np.random.default_rng(2)
    for _ in range(50):
        rows = rng.integers(0, len(data), 32)
        np.testing.assert_array_equal(cache.gather(rows), data[rows])
    assert sorted(loaded) == list(range(13))


def test_the_least_recently_used_chunk_is_evicted():
    data = _data()
    cache, loaded = _cache(data, slots=2)
    for chunk in (0, 1, 0, 2):  # chunk 1 is now the least recently used
        cache.gather(np.array([chunk * CHUNK_ROWS]))
    assert loaded == [0, 1, 2]
    cache.gather(np.array([0]))
    assert loaded == [0, 1, 2]  # 0 stayed
    cache.gather(np.array([CHUNK_ROWS]))
    assert loaded == [0, 1, 2, 1]  # 1 was evicted


def test_a_batch_wider_than_the_cache_grows_it():
    data = _data()
    cache, loaded = _cache(data, slots=2)
    rows = np.array([5, 99, 40, 6, 60, 99])  # 4 distinct chunks, including the short last one
    np.testing.assert_array_equal(cache.gather(rows), data[rows])
    assert len(cache.slab) == 4 and sorted(loaded) == [0, 5, 7, 12]
    np.testing.assert_array_equal(cache.gather(rows[::-1]), data[rows[::-1]])
    assert len(loaded) == 4
