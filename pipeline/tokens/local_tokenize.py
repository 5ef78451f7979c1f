"""Tokenize a shard folder into a store in this process, without Ray: the store's own region
writer, `encode_unit`, markers and finalize, one work unit after another. For small jobs inside
other jobs and benchmarks (retrain's downstream `prior_bits`, `tokenmill bench prior`); a dataset
is tokenized with `tokenmill tokenize` (`pipeline.tokenize.driver`)."""

from __future__ import annotations

from typing import Any


def tokenize_in_process(files, shards_url: str, store_url: str, batch_size: int = 256,
                        storage_options: dict[str, Any] | None = None, extra_lineage: dict[str, Any] | None = None) -> str:
    """Encode every shard `shards_url`'s manifest lists with model `files` (a resolved `ModelFiles`)
    into a new store at `store_url` (replacing one there); returns its URL."""
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.runtime.storage import join
    from tokenmill.pipeline.shards.manifest import manifest_url, read_manifest
    from tokenmill.pipeline.tokens.encode_unit import encode_unit
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, tokenizer_lineage
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import TokenStore

    options = storage_options or {}
    manifest = read_manifest(shards_url, options)
    if not manifest or not manifest["shards"]:
        raise UserError(f"{shards_url} has no manifest listing shards; shard the images with `tokenmill shard`")
    folder = manifest_url(shards_url).rsplit("/", 1)[0]
    entries = [(join(folder, s["url"]), s["split"], s["count"]) for s in manifest["shards"]]
    encoder = load_tokenizer(files, ExtractionOptions())
    layout = plan_layout(entries, max(spec.row_bytes for spec in encoder.specs))
    store = TokenStore(store_url, options)
    lineage = {**tokenizer_lineage(files, encoder, ExtractionOptions()), "data": shards_url, **(extra_lineage or {})}
    store.prepare(lineage, layout, encoder.specs, overwrite=True)
    for unit in layout.units:
        encode_unit(unit, store, layout.rows_per_zarr_shard, encoder, batch_size, options)
    store.finalize(layout, encoder.specs)
    return store.url
