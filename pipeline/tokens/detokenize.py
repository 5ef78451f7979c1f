"""Detokenizing: stored codes or latents back to images through the store's model (the inverse of
`pipeline.tokenize.driver`; image *file* decoding is `pipeline.shards.images`).

Rows are item indices over the store's good samples in store order (input shard order, then tar
order; `split` picks one split, as `TokenDataset` numbers them). The model is the one the
store's lineage names (found as `pipeline.registry.resolver` says: a recorded copy, the recorded
registry, the current one), or `model_ref`: a tokenmill model or a `diffusers:` autoencoder, checked
against the recorded weights sha256. Every store decodes: codes, single latents, a hierarchical
VAE's latent groups; of a store written with `--augment`, the un-augmented variant 0.
"""

from __future__ import annotations

from pathlib import Path

GRID = 64  # images per PNG (8 x 8)


def detokenize_store(store_url: str, out: Path, start: int, stop: int, *, split: str | None = None,
                 model_ref: str | None = None, tracking_uri: str | None = None,
                 storage_options: dict | None = None) -> list[Path]:
    """Decode items [start, stop) of `store_url` and write them as PNG grids of 64 under `out`."""
    from tokenmill.pipeline.grids import save_png_grid

    decoder = StoreDecoder(store_url, model_ref=model_ref, tracking_uri=tracking_uri,
                           storage_options=storage_options)
    paths = []
    for i, images in enumerate(decoder.images(start, stop, split)):
        paths.append(save_png_grid(images, out / f"grid-{start // GRID + i:05d}.png"))
    return paths


class StoreDecoder:
    """A store and the tokenizer its lineage names; `images(start, stop)` yields batches of
    `GRID` decoded items (B, C, H, W) in [0, 1]."""

    def __init__(self, store_url: str, *, model_ref: str | None = None, tracking_uri: str | None = None,
                 storage_options: dict | None = None):
        from tokenmill.models.errors import UserError
        from tokenmill.pipeline.registry.resolver import Recorded, resolve_recorded, resolve_reference
        from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer
        from tokenmill.pipeline.tokens.store import TokenStore
        from tokenmill.pipeline.tokens.store_rows import store_variants

        self.url, self.store = store_url, TokenStore(store_url, storage_options)
        attrs = self.store.token_attrs()
        lineage = attrs["lineage"]
        recorded, found = Recorded.of_store(lineage), None
        if model_ref is None:
            found = resolve_recorded(recorded, owner=store_url, what="model", tracking_uri=tracking_uri,
                                     storage_options=storage_options,
                                     fix="pass the store's model with --model, or the registry that holds it "
                                         "with --tracking-uri")
            files = found.files
        else:
            files = resolve_reference(model_ref, tracking_uri, storage_options)
            if files.weights_sha256 != recorded.sha256:
                raise UserError(f"{model_ref} has weights sha256 {files.weights_sha256[:12]}…, but {store_url} was "
                                f"made with {recorded.sha256[:12]}…; pass the store's model with --model")
        self.tokenizer = load_tokenizer(files, ExtractionOptions.from_lineage(lineage))
        self.found = found  # announced once the rows asked for are accepted
        self.names = [spec["name"] for spec in attrs["arrays"]]
        self.variants = store_variants(lineage)

    def images(self, start: int, stop: int, split: str | None = None):
        import numpy as np

        from tokenmill.models.errors import UserError
        from tokenmill.pipeline.tokens.extraction import decode_rows

        items = self.store.item_rows(split)
        rows = items[start:stop]
        if len(rows) == 0:
            raise UserError(f"{self.url} has {len(items)} items; --rows {start}:{stop} selects none")
        if self.found:
            self.found.announce()
            self.found = None
        group = self.store.open_group("r")
        for i in range(0, len(rows), GRID):
            chunk = rows[i : i + GRID]
            # Contiguous runs make whole-chunk reads; zarr's orthogonal index handles any set.
            arrays = [np.asarray(group[n].oindex[chunk]) for n in self.names]
            if self.variants > 1:
                arrays = [a[:, 0] for a in arrays]
            yield decode_rows(self.tokenizer, self.names, arrays)
