"""The one shard reader behind every consumer: the training stream (Ray Data), tokenization's
per-unit encoding and the manifest scan report a dirty shard's bad samples identically, one
record {"shard", "key", "reason"} each. (The reader itself: tests/unit/test_reader.py.)"""

from __future__ import annotations

import pytest
from helpers.shards import DIRTY_KINDS as EXPECTED_KINDS
from helpers.shards import write_dirty_shard
from helpers.tokens import make_vqvae

from tokenmill.pipeline.shards.problems import kind_of


@pytest.fixture(scope="module")
def dirty_shard(tmp_path_factory) -> str:
    """A corrupt PNG, a sample without an image and a cut tar (helpers.shards.write_dirty_shard)."""
    return write_dirty_shard(tmp_path_factory.mktemp("dirty") / "dirty-000000.tar")


def test_stream_tokenization_and_scan_report_a_dirty_shard_identically(ray_local, dirty_shard, tmp_path):
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.shards.manifest import scan_shard
    from tokenmill.pipeline.shards.stream import StreamConfig, open_stream
    from tokenmill.pipeline.tokens.encode_unit import encode_unit
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import TokenStore, describe_store

    encoder = TokenEncoder(resolve_model(str(make_vqvae(tmp_path / "model"))), latents=False)
    stream = open_stream([dirty_shard], StreamConfig(transform=encoder.transform, shuffle=False))
    assert sorted(stream.dataset.to_pandas()["key"]) == ["g0", "g1", "g2", "g3"]
    streamed = stream.report()["errors"]

    layout = plan_layout([(dirty_shard, "train", 7)], max(spec.row_bytes for spec in encoder.specs))
    store = TokenStore(str(tmp_path / "tokens.zarr"))
    store.prepare({"model_uri": "test", "mode": "codes"}, layout, encoder.specs, overwrite=False)
    [result] = encode_unit(layout.units[0], store, layout.rows_per_zarr_shard, encoder, 2, {})
    assert result["rows"] == 4
    store.finalize(layout, encoder.specs)
    tokenized = describe_store(str(tmp_path / "tokens.zarr"))["corrupt"]  # the store's report

    def ordered(records):
        return sorted(records, key=lambda r: (r["shard"], r["key"], r["reason"]))

    assert ordered(result["corrupt"]) == ordered(tokenized) == ordered(streamed)
    assert {r["key"]: kind_of(r["reason"]) for r in streamed} == EXPECTED_KINDS
    assert all(set(r) == {"shard", "key", "reason"} and r["shard"] == dirty_shard for r in streamed)
    assert ordered(scan_shard(dirty_shard).problems) == ordered(streamed)

