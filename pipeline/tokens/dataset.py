"""`TokenDataset`: token sequences from a finished token store, for Transformer training.

Item i is the i-th good sample of the chosen split in store order (input shard order, then tar
order): `{"tokens": int64 (L,), "label": int64 ()}` with the codes in raster order (levels
concatenated in store order), optionally preceded by a BOS token and/or a class token.
Vocabulary: codes [0, K), then BOS = K, then class tokens K + bos + label (label -1 -> the
"no class" token K + bos + num_classes). A map-style Dataset: works with DistributedSampler.

Reads are whole chunks: when the split's tokens fit in `cache_bytes` they are read once (whole
Zarr shards, the fastest path) into one array; otherwise an LRU cache of inner chunks
(`pipeline.tokens.chunk_cache`) serves random access. Nothing is read at construction beyond the small
shard table and labels, and the cache is not pickled, so DataLoader workers each fill their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.errors import UserError
from pipeline.tokens.chunk_cache import ChunkCache
from pipeline.tokens.store import TokenStore


class TokenDataset(torch.utils.data.Dataset):
    def __init__(
        self, store_url: str, split: str | None = "train", *, add_bos: bool = False, class_token: bool = False,
        num_classes: int | None = None, storage_options: dict[str, Any] | None = None,
        cache_bytes: int = 1 << 30,
    ):
        self.store = TokenStore(store_url, storage_options)
        attrs = self.store.attrs()
        if attrs.get("tokenmill", {}).get("state") != "complete":
            raise UserError(f"{store_url} is not a finished token store; rerun `tokenmill tokenize` to complete it")
        self.specs = [s for s in attrs["arrays"] if s["codebook_size"] is not None]
        if not self.specs:
            raise UserError(f"{store_url} holds latents, not codes; TokenDataset reads code stores")
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
        self.codebook_size = max(s["codebook_size"] for s in self.specs)
        self.add_bos, self.class_token = add_bos, class_token
        self.num_classes = num_classes if num_classes is not None else int(max(labels_all[:].max(), -1)) + 1
        self.seq_len = sum(int(np.prod(s["row_shape"])) for s in self.specs) + add_bos + class_token
        row_bytes = sum(int(np.prod(s["row_shape"])) * np.dtype(s["dtype"]).itemsize for s in self.specs)
        self.resident = len(self) * row_bytes <= cache_bytes
        self.cache_bytes = cache_bytes
        self._tokens: np.ndarray | None = None
        self._chunks: ChunkCache | None = None

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.add_bos + (self.num_classes + 1 if self.class_token else 0)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_chunks": None}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batch([index])
        return {"tokens": batch["tokens"][0], "label": batch["labels"][0]}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Stacked items: tokens int64 (B, seq_len), labels int64 (B,). The fast path for a
        sampler's index batch."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items")
        indices = indices % max(len(self), 1)
        codes = self._resident()[indices] if self.resident else self._chunk_cache().gather(self._rows(indices))
        labels = self.labels[indices]
        prefix = []
        if self.add_bos:
            prefix.append(np.full((len(indices), 1), self.codebook_size, dtype=np.int64))
        if self.class_token:
            classes = np.where(labels >= 0, labels, self.num_classes)
            prefix.append((self.codebook_size + self.add_bos + classes)[:, None])
        tokens = np.concatenate([*prefix, codes.astype(np.int64)], axis=1) if prefix else codes.astype(np.int64)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}

    # -- reading ----------------------------------------------------------------------------
    def _rows(self, indices: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._offsets, indices, side="right") - 1
        return self._starts[shard] + (indices - self._offsets[shard])

    def _resident(self) -> np.ndarray:
        """(len, L) codes of every item, read once as whole row ranges (whole Zarr shards)."""
        if self._tokens is None:
            group = self.store.open_group("r")
            counts = np.diff(self._offsets)
            levels = []
            for spec in self.specs:
                arr = group[spec["name"]]
                width = int(np.prod(arr.shape[1:]))  # not -1: an input shard may have no good sample
                parts = [arr[s : s + n].reshape(n, width) for s, n in zip(self._starts, counts)]
                levels.append(np.concatenate(parts))
            self._tokens = np.concatenate(levels, axis=1) if len(levels) > 1 else levels[0]
        return self._tokens

    def _chunk_cache(self) -> ChunkCache:
        """Store rows -> (B, L) codes through an LRU cache of inner chunks (all levels share
        the chunk rows, so one cached chunk holds every level of its rows)."""
        if self._chunks is None:
            group = self.store.open_group("r")
            arrays = [group[spec["name"]] for spec in self.specs]
            chunk_rows, rows = arrays[0].chunks[0], arrays[0].shape[0]
            width = sum(int(np.prod(spec["row_shape"])) for spec in self.specs)
            dtype = np.result_type(*(arr.dtype for arr in arrays))

            def load(chunk: int) -> np.ndarray:  # (chunk_rows, L), fewer rows for the last chunk
                span = slice(chunk * chunk_rows, (chunk + 1) * chunk_rows)
                return np.concatenate([arr[span].reshape(-1, int(np.prod(arr.shape[1:]))) for arr in arrays], axis=1)

            slots = max(1, self.cache_bytes // (chunk_rows * width * dtype.itemsize))
            self._chunks = ChunkCache(load, -(-rows // chunk_rows), chunk_rows, width, dtype, slots)
        return self._chunks
