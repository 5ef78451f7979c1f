"""`TokenDataset`: token sequences from a finished token store, for Transformer training.

Item i is the i-th good sample of the chosen split in store order (input shard order, then tar
order): `{"tokens": int64 (L,), "label": int64 ()}` with the codes in raster order (levels
concatenated in store order), optionally preceded by a BOS token and/or a class token.
Vocabulary: codes [0, K), then BOS = K, then class tokens K + bos + label (label -1 -> the
"no class" token K + bos + num_classes). A map-style Dataset: works with DistributedSampler.

Reads are whole chunks: when the split's tokens fit in `cache_bytes` they are read once (whole
Zarr shards, the fastest path) into one array; otherwise an LRU cache of inner chunks serves
random access. Nothing is read at construction beyond the small shard table and labels, and
the cache is not pickled, so DataLoader workers each fill their own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from models.errors import UserError
from pipeline.token_store import TokenStore


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
        self.cache_chunks = max(1, cache_bytes // max(1, row_bytes * group[self.specs[0]["name"]].chunks[0]))
        self._tokens: np.ndarray | None = None
        self._arrays: dict[str, Any] | None = None  # opened zarr arrays (metadata read once)
        self._chunks: OrderedDict = OrderedDict()

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.add_bos + (self.num_classes + 1 if self.class_token else 0)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_arrays": None, "_chunks": OrderedDict()}

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
        codes = self._resident()[indices] if self.resident else self._gather(self._rows(indices))
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
                parts = [arr[s : s + n].reshape(n, -1) for s, n in zip(self._starts, counts)]
                levels.append(np.concatenate(parts))
            self._tokens = np.concatenate(levels, axis=1) if len(levels) > 1 else levels[0]
        return self._tokens

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """(B, L) codes of store rows through the LRU cache of inner chunks."""
        if self._arrays is None:
            group = self.store.open_group("r")
            self._arrays = {spec["name"]: group[spec["name"]] for spec in self.specs}
        levels = []
        for spec in self.specs:
            arr = self._arrays[spec["name"]]
            chunk_rows = arr.chunks[0]
            out = np.empty((len(rows), int(np.prod(spec["row_shape"]))), dtype=arr.dtype)
            chunk_ids = rows // chunk_rows
            for chunk in np.unique(chunk_ids):
                mask = chunk_ids == chunk
                out[mask] = self._chunk(spec["name"], arr, int(chunk), chunk_rows)[rows[mask] - chunk * chunk_rows]
            levels.append(out)
        return np.concatenate(levels, axis=1) if len(levels) > 1 else levels[0]

    def _chunk(self, name: str, arr, chunk: int, chunk_rows: int) -> np.ndarray:
        key = (name, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        block = arr[chunk * chunk_rows : (chunk + 1) * chunk_rows]
        block = block.reshape(len(block), -1)
        self._chunks[key] = block
        if len(self._chunks) > self.cache_chunks * len(self.specs):
            self._chunks.popitem(last=False)
        return block
