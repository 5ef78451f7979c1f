"""Where every input shard's rows live in the token store, decided once by the driver.

Zarr loses data when two writers touch one chunk or one shard object, so the store is cut into
work units, each written by one writer and owning a row range that is a whole number of Zarr
shards. A unit is a run of consecutive input shards: one input shard per unit up to
`MAX_UNITS` input shards, then as many per unit as keep the units at most `MAX_UNITS`, so the
store's object count stops growing with the number of input shards (a unit writes one object
per Zarr shard of each per-row array, plus one marker). Inside a unit each input shard owns
`count` rows (its manifest count) and the last one also the unit's tail; good samples fill an
input shard's rows from its start in tar order, the rest are fill values (empty inner chunks
are not even stored). Rows per Zarr shard are the largest unit rounded up to a chunk (at most
`MAX_SHARD_BYTES`), so a typical unit is exactly one object per array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# An inner chunk is what one random read decompresses: small enough for cheap random access.
TARGET_CHUNK_BYTES = 256 * 1024
# One Zarr shard object stays below this (uncompressed), so a writer holds at most one in memory;
# bigger units span several Zarr shards (still one writer each).
MAX_SHARD_BYTES = 256 * 1024 * 1024
# Work units at most (when input shards are few enough, one input shard per unit). 16,384 units
# of codes, keys, labels and a marker are ~66k objects, whatever the number of samples (10^9
# samples in img2dataset's 10,000-sample shards: 7 input shards per unit).
MAX_UNITS = 16_384


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
class WorkUnit:
    """Consecutive input shards written by one writer, with one marker: rows [row_start,
    row_start + capacity), a whole number of Zarr shards."""

    index: int
    shards: tuple[InputShardSlot, ...]

    @property
    def row_start(self) -> int:
        return self.shards[0].row_start

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.shards)

    def to_json(self) -> dict:
        return {"index": self.index, "shards": [vars(s) for s in self.shards]}

    @classmethod
    def from_json(cls, data: dict) -> "WorkUnit":
        return cls(data["index"], tuple(InputShardSlot(**s) for s in data["shards"]))


@dataclass(frozen=True)
class Layout:
    chunk_rows: int  # rows per inner chunk of the token array(s)
    rows_per_zarr_shard: int  # rows per Zarr shard object (every array); a unit's capacity is a multiple of it
    rows: int  # total rows of every per-row array
    units: tuple[WorkUnit, ...]

    @property
    def shards(self) -> tuple[InputShardSlot, ...]:
        return tuple(s for unit in self.units for s in unit.shards)

    @property
    def shards_per_unit(self) -> int:
        return max((len(u.shards) for u in self.units), default=1)

    def to_dict(self) -> dict:
        """What lineage compares: a store laid out differently cannot be resumed."""
        # "shard_rows" is the key stores already carry; renaming it would refuse their resume.
        layout = {"chunk_rows": self.chunk_rows, "shard_rows": self.rows_per_zarr_shard, "rows": self.rows}
        return layout if self.shards_per_unit == 1 else {**layout, "shards_per_unit": self.shards_per_unit}


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def plan_layout(shards: list[tuple[str, str, int]], row_bytes: int, max_units: int | None = None) -> Layout:
    """`shards`: (url, split, count) in manifest order; `row_bytes`: bytes of one row of the
    largest per-row array (e.g. h*w*2 for uint16 codes); `max_units`: `MAX_UNITS` unless given."""
    row_bytes = max(1, row_bytes)
    per_unit = max(1, math.ceil(len(shards) / (max_units or MAX_UNITS)))
    groups = [shards[i : i + per_unit] for i in range(0, len(shards), per_unit)]
    chunk_rows = min(8192, _pow2_floor(TARGET_CHUNK_BYTES // row_bytes))
    largest = max((sum(count for _, _, count in group) for group in groups), default=1)
    max_rows = max(chunk_rows, (MAX_SHARD_BYTES // row_bytes) // chunk_rows * chunk_rows)
    rows_per_zarr_shard = min(max_rows, math.ceil(max(largest, 1) / chunk_rows) * chunk_rows)
    units, start, index = [], 0, 0
    for group in groups:
        unit_rows = sum(count for _, _, count in group)
        unit_end = start + math.ceil(unit_rows / rows_per_zarr_shard) * rows_per_zarr_shard
        slots = []
        for position, (url, split, count) in enumerate(group):
            capacity = unit_end - start if position == len(group) - 1 else count  # the last one takes the tail
            slots.append(InputShardSlot(index, url, split, count, start, capacity))
            start, index = start + capacity, index + 1
        units.append(WorkUnit(len(units), tuple(slots)))
    return Layout(chunk_rows, rows_per_zarr_shard, start, tuple(units))
