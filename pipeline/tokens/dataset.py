"""`TokenDataset`: token sequences from a finished token store, for Transformer training.

Item i is the i-th good sample of the chosen split in store order (input shard order, then tar
order): `{"tokens": int64 (L,), "label": int64 ()}` with the codes in raster order (levels
concatenated in store order), optionally preceded by a BOS token and/or a class token.
Vocabulary: codes [0, K), then BOS = K, then class tokens K + bos + label (label -1 -> the
"no class" token K + bos + num_classes). A map-style Dataset: works with DistributedSampler.
Stores written with `--augment` hold several encodings per sample; each item is one of them,
another each epoch (`set_epoch`, seeded by `seed`).

Reads are whole chunks (`pipeline.tokens.store_rows`): when the split's tokens fit in
`cache_bytes` they are read once (whole Zarr shards, the fastest path) into one array;
otherwise an LRU cache of inner chunks serves random access, the chunks one batch misses read on
`read_threads` threads at once and, for a remote store, through a folder shared by the node's
ranks (`node_cache_dir`, at most `node_cache_bytes`; `pipeline.tokens.node_cache`). Nothing is read at construction
beyond the small shard table and labels, and the cache is not pickled, so DataLoader workers
each fill their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.store_rows import StoreRows


class TokenDataset(StoreRows):
    def __init__(
        self, store_url: str, split: str | None = "train", *, add_bos: bool = False, class_token: bool = False,
        num_classes: int | None = None, storage_options: dict[str, Any] | None = None,
        cache_bytes: int = 1 << 30, seed: int = 0, read_threads: int = 1, node_cache_dir: str | None = None,
        node_cache_bytes: int = 0,
    ):
        super().__init__(store_url, split, storage_options, cache_bytes, seed, read_threads=read_threads,
                         node_cache_dir=node_cache_dir, node_cache_bytes=node_cache_bytes)
        self.codebook_size = max(s["codebook_size"] for s in self.specs)
        self.add_bos, self.class_token = add_bos, class_token
        self.num_classes = num_classes if num_classes is not None else self._max_label + 1
        self.seq_len = sum(int(np.prod(self.item_shape(s))) for s in self.specs) + add_bos + class_token

    def _select_specs(self, store_url: str, arrays: list[dict[str, Any]]) -> list[dict[str, Any]]:
        specs = [s for s in arrays if s["codebook_size"] is not None]
        if not specs:
            raise UserError(f"{store_url} holds latents, not codes; read it with "
                            "tokenmill.pipeline.tokens.latent_dataset.LatentDataset")
        return specs

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.add_bos + (self.num_classes + 1 if self.class_token else 0)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batch([index])
        return {"tokens": batch["tokens"][0], "label": batch["labels"][0]}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Stacked items: tokens int64 (B, seq_len), labels int64 (B,). The fast path for a
        sampler's index batch."""
        if self.variants == 1:  # flat rows already are the levels' codes concatenated in store order
            _, codes, labels = self.read_rows(indices)
        else:
            indices, levels, labels = self.read(indices)
            codes = np.concatenate([lv.reshape(len(indices), -1) for lv in levels], axis=1)
        prefix = int(self.add_bos) + int(self.class_token)
        tokens = np.empty((len(labels), prefix + codes.shape[1]), dtype=np.int64)  # (B, seq_len)
        tokens[:, prefix:] = codes  # the one widening copy (a concatenate would copy twice)
        if self.add_bos:
            tokens[:, 0] = self.codebook_size
        if self.class_token:
            tokens[:, int(self.add_bos)] = self.codebook_size + self.add_bos + np.where(labels >= 0, labels, self.num_classes)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}
