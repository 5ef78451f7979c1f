"""The token store's format, as plain data: its version, the per-row arrays (`ArraySpec`), their
code dtype, and the names of its fixed nodes and dimensions.

A leaf module (numpy only): `store` (the store's driver and writers) and `store_nodes` (its Zarr
nodes) both import it, and neither imports the other's caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 2: dimension names, `valid`, the markers group as the creation claim, consolidated root.
# 3: work units of several input shards, one marker per unit; `valid` in large chunks.
FORMAT_VERSION = 3

MARKERS = "markers"  # the creation claim; a child group per finished work unit
REPORT = "report"  # every corrupt sample (key, shard, reason)
ROW_DIM = "sample"  # the dimension every per-row array starts with
SHARD_DIM = "input_shard"  # the dimension of the shard table


@dataclass(frozen=True)
class ArraySpec:
    """One per-row token array: `codes` / `codes_<level>` (with its codebook size) or `latents`."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    codebook_size: int | None = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize

    @property
    def counts_name(self) -> str:
        return self.name.replace("codes", "codebook_counts", 1)


def codes_dtype(codebook_size: int) -> str:
    return "uint16" if codebook_size <= 65_536 else "uint32"
