"""`LatentDataset`: continuous latents from a finished token store, e.g. for a latent-diffusion
Transformer (the store of `tokenmill tokenize --latents`).

Item i is the i-th good sample of the chosen split in store order (as `TokenDataset`):
`{"latents": float32 (C, h, w), "label": int64 ()}` for single-latent models (VAE, diffusers'
`AutoencoderKL`; already multiplied by the scaling factor the lineage records), or one entry
per latent group `latents_<group>` (hierarchical VAE, coarse to fine). A map-style Dataset
that works with DistributedSampler; resident or chunk-cached reads and per-epoch augmentation
variants as `TokenDataset` (`pipeline.tokens.store_rows`). Imports only torch, zarr and numpy.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.store_rows import StoreRows


class LatentDataset(StoreRows):
    def __init__(self, store_url: str, split: str | None = "train", *,
                 storage_options: dict[str, Any] | None = None, cache_bytes: int = 1 << 30, seed: int = 0):
        super().__init__(store_url, split, storage_options, cache_bytes, seed)
        self.names = [s["name"] for s in self.specs]
        self.shapes = {s["name"]: self.item_shape(s) for s in self.specs}  # per item, e.g. (4, 8, 8)
        self.num_classes = self._max_label + 1

    def _select_specs(self, store_url: str, arrays: list[dict[str, Any]]) -> list[dict[str, Any]]:
        specs = [s for s in arrays if s["codebook_size"] is None]
        if not specs:
            raise UserError(f"{store_url} holds codes, not latents; read it with pipeline.tokens.dataset.TokenDataset")
        return specs

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batch([index])
        return {**{name: batch[name][0] for name in self.names}, "label": batch["labels"][0]}

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """Stacked items: every latent array float32 (B, ...) and labels int64 (B,)."""
        _, arrays, labels = self.read(indices)
        out = {name: torch.from_numpy(arr.astype("float32")) for name, arr in zip(self.names, arrays)}
        return {**out, "labels": torch.from_numpy(labels)}
