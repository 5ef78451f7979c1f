"""Where every input shard's rows live in the token store, decided once by the driver.

Zarr loses data when two writers touch one chunk or one shard object, so each input shard owns
a row range that is a whole number of Zarr shards: `capacity = ceil(count / rows_per_zarr_shard) *
rows_per_zarr_shard`. Good samples fill the range from its start in tar order; the tail is fill values
(empty inner chunks are not even stored). Rows per Zarr shard are the largest input shard
rounded up to a chunk, so a typical input shard is exactly one object per array: with
img2dataset's 10,000-sample shards a billion samples make ~100k objects per array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# An inner chunk is what one random read decompresses: small enough for cheap random access.
TARGET_CHUNK_BYTES = 256 * 1024
# One Zarr shard object stays below this (uncompressed), so a writer holds at most one in memory;
# bigger input shards span several Zarr shards (still one writer each).
MAX_SHARD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class InputShardSlot:
    """One input shard's slot: rows [row_start, row_start + capacity) of every per-row array."""

    index: int
    url: str
    split: str
    count: int  # samples listed in the manifest (good + corrupt)
    row_start: int
    capacity: int


@dataclass(frozen=True)
class Layout:
    chunk_rows: int  # rows per inner chunk of the token array(s)
    rows_per_zarr_shard: int  # rows per Zarr shard object (every array); capacity is a multiple of it
    rows: int  # total rows of every per-row array
    shards: tuple[InputShardSlot, ...]

    def to_dict(self) -> dict:
        """What lineage compares: a store laid out differently cannot be resumed."""
        # "shard_rows" is the key stores already carry; renaming it would refuse their resume.
        return {"chunk_rows": self.chunk_rows, "shard_rows": self.rows_per_zarr_shard, "rows": self.rows}


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def plan_layout(shards: list[tuple[str, str, int]], row_bytes: int) -> Layout:
    """`shards`: (url, split, count) in manifest order; `row_bytes`: bytes of one row of the
    largest per-row array (e.g. h*w*2 for uint16 codes)."""
    row_bytes = max(1, row_bytes)
    chunk_rows = min(8192, _pow2_floor(TARGET_CHUNK_BYTES // row_bytes))
    largest = max((count for _, _, count in shards), default=1)
    max_rows = max(chunk_rows, (MAX_SHARD_BYTES // row_bytes) // chunk_rows * chunk_rows)
    rows_per_zarr_shard = min(max_rows, math.ceil(max(largest, 1) / chunk_rows) * chunk_rows)
    plans, start = [], 0
    for index, (url, split, count) in enumerate(shards):
        capacity = math.ceil(count / rows_per_zarr_shard) * rows_per_zarr_shard
        plans.append(InputShardSlot(index, url, split, count, start, capacity))
        start += capacity
    return Layout(chunk_rows, rows_per_zarr_shard, start, tuple(plans))
