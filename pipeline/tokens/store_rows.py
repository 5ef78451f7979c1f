"""`StoreRows`: what `TokenDataset` and `LatentDataset` share — a finished store's items of one
split, their labels, and whole-chunk reads of chosen per-row arrays, with one augmentation
variant picked per item and epoch.

Item i is the i-th good sample of the split in store order (input shard order, then tar
order). Rows are read as flat `(B, width)` arrays, the chosen arrays' rows flattened and
concatenated in store order. When the split fits in `cache_bytes` every row is read once
(whole Zarr shards, the fastest path); otherwise an LRU cache of inner chunks
(`pipeline.tokens.chunk_cache`) serves random access. Stores written with `--augment` hold
`variants` encodings per sample along axis 1 of each array; `pick` keeps one per item,
chosen by a hash of (seed, epoch, item), so every rank and DataLoader worker agrees and each
epoch (`set_epoch`) sees other variants. Only torch, zarr and numpy are imported.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.chunk_cache import ChunkCache
from tokenmill.pipeline.tokens.node_cache import NodeChunkCache, store_namespace
from tokenmill.pipeline.tokens.objects import is_local
from tokenmill.pipeline.tokens.store import TokenStore


def store_variants(lineage: dict[str, Any]) -> int:
    """Encodings per sample of a store: 1, or the augmentation's variant count."""
    return int((lineage.get("augment") or {}).get("variants", 1))


def variant_of(seed: int, epoch: int, items: np.ndarray, variants: int) -> np.ndarray:
    """A variant in [0, variants) per item: splitmix64 of (seed, epoch, item), vectorised."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch) * np.uint64(0xBF58476D1CE4E5B9)
             + items.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(variants)).astype(np.int64)


class StoreRows(torch.utils.data.Dataset):
    """Base of the store readers; subclasses choose `self.specs` (array entries of the store's
    attributes) with `_select_specs` and build items from `read(indices)`."""

    def __init__(self, store_url: str, split: str | None, storage_options: dict[str, Any] | None,
                 cache_bytes: int, seed: int = 0, *, read_threads: int = 1, node_cache_dir: str | None = None,
                 node_cache_bytes: int = 0):
        self.store = TokenStore(store_url, storage_options)
        self.read_threads = read_threads
        # The node-local chunk cache only where a chunk is costly to fetch: a store on another machine.
        self.node_cache = None
        if node_cache_dir and node_cache_bytes > 0 and not is_local(self.store.fs):
            with contextlib.suppress(OSError):  # a folder this user cannot write: every rank fetches for itself
                self.node_cache = NodeChunkCache(node_cache_dir, node_cache_bytes)
        attrs = self.store.attrs()
        if attrs.get("tokenmill", {}).get("state") != "complete":
            raise UserError(f"{store_url} is not a finished token store; rerun `tokenmill tokenize` to complete it")
        self._attrs = attrs
        self.lineage = attrs.get("lineage", {})
        self.variants = store_variants(self.lineage)
        self.specs = self._select_specs(store_url, attrs["arrays"])
        group = self.store.open_group("r")
        table = {name: group[f"shards/{name}"][:] for name in ("row_start", "count", "split")}
        chosen = np.ones(len(table["split"]), bool) if split is None else table["split"] == split
        if not chosen.any():
            raise UserError(f"{store_url} has no {split!r} samples; splits: {sorted(set(table['split'].tolist()))}")
        # Item -> store row: items of one input shard are contiguous rows from its row_start.
        self._starts = table["row_start"][chosen]
        self._offsets = np.concatenate([[0], np.cumsum(table["count"][chosen])])
        labels_all = group["labels"]
        self.labels = np.concatenate([labels_all[s : s + n] for s, n in zip(self._starts, table["count"][chosen])])
        self._max_label = int(max(labels_all[:].max(), -1))
        row_bytes = sum(int(np.prod(s["row_shape"])) * np.dtype(s["dtype"]).itemsize for s in self.specs)
        self.resident = len(self) * row_bytes <= cache_bytes
        self.cache_bytes, self.seed, self.epoch = cache_bytes, seed, 0
        self._rows_all: np.ndarray | None = None
        self._chunks: ChunkCache | None = None

    def _select_specs(self, store_url: str, arrays: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def item_shape(self, spec: dict[str, Any]) -> tuple[int, ...]:
        """One item's shape of an array: its row shape without the variant axis."""
        shape = tuple(spec["row_shape"])
        return shape[1:] if self.variants > 1 else shape

    def set_epoch(self, epoch: int) -> None:
        """Pick other augmentation variants (as `DistributedSampler.set_epoch`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows_all": None, "_chunks": None}

    def read_rows(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Item indices -> (indices in [0, len), flat rows (B, width) in the store's dtype, labels (B,)).
        The hot path of every batch: one `take` per array, no per-spec Python."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.resident:
            flat = self._resident().take(indices, axis=0)  # IndexError when out of range; negatives wrap
        else:
            indices = self._in_range(indices)
            flat = self._chunk_cache().gather(self._rows(indices))
        if indices.size and indices.min() < 0:
            indices = indices + len(self)
        return indices, flat, self.labels.take(indices)

    def read(self, indices) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Item indices -> (indices in range, one (B, *item_shape) array per spec, labels (B,))."""
        indices, flat, labels = self.read_rows(indices)
        variant = variant_of(self.seed, self.epoch, indices, self.variants) if self.variants > 1 else None
        arrays, offset = [], 0
        for spec in self.specs:
            width = int(np.prod(spec["row_shape"]))
            part = flat[:, offset : offset + width].reshape(len(indices), *spec["row_shape"])
            arrays.append(part[np.arange(len(indices)), variant] if variant is not None else part)
            offset += width
        return indices, arrays, labels

    def _in_range(self, indices: np.ndarray) -> np.ndarray:
        if not indices.size:
            return indices
        low, high = indices.min(), indices.max()
        if low < -len(self) or high >= len(self):
            raise IndexError(f"index out of range for {len(self)} items")
        return indices + len(self) * (indices < 0) if low < 0 else indices

    # -- reading ----------------------------------------------------------------------------
    def _rows(self, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        return self._starts[shard] + (indices - self._offsets[shard])

    def _resident(self) -> np.ndarray:
        """(len, width) rows of every item, read once as whole row ranges (whole Zarr shards)."""
        if self._rows_all is None:
            group = self.store.open_group("r")
            counts = np.diff(self._offsets)
            parts = []
            for spec in self.specs:
                arr = group[spec["name"]]
                width = int(np.prod(arr.shape[1:]))  # not -1: an input shard may have no good sample
                parts.append(np.concatenate([arr[s : s + n].reshape(n, width) for s, n in zip(self._starts, counts)]))
            self._rows_all = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return self._rows_all

    def _chunk_cache(self) -> ChunkCache:
        """Store rows -> (B, width) through an LRU cache of inner chunks (all arrays share the
        chunk rows, so one cached chunk holds every array of its rows)."""
        if self._chunks is None:
            group = self.store.open_group("r")
            arrays = [group[spec["name"]] for spec in self.specs]
            chunk_rows, rows = arrays[0].chunks[0], arrays[0].shape[0]
            width = sum(int(np.prod(spec["row_shape"])) for spec in self.specs)
            dtype = np.result_type(*(arr.dtype for arr in arrays))

            def fetch(chunk: int) -> np.ndarray:  # (chunk_rows, width), fewer rows for the last chunk
                span = slice(chunk * chunk_rows, (chunk + 1) * chunk_rows)
                return np.concatenate([arr[span].reshape(-1, int(np.prod(arr.shape[1:]))) for arr in arrays], axis=1)

            prefix = store_namespace(self.store.url, [spec["name"] for spec in self.specs], self._attrs)

            def load(chunk: int) -> np.ndarray:  # through the node's shared folder when there is one
                node = self.node_cache
                return fetch(chunk) if node is None else node.get(f"{prefix}-{chunk}", lambda: fetch(chunk))
            slots = max(1, self.cache_bytes // (chunk_rows * width * dtype.itemsize))
            self._chunks = ChunkCache(load, -(-rows // chunk_rows), chunk_rows, width, dtype, slots,
                                      self.read_threads)
        return self._chunks
