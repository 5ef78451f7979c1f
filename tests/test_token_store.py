"""Token store layout and writes without Ray: aligned, exactly-once regions, lineage, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from tokenize_helpers import array_bytes, build_store

from models.errors import UserError
from pipeline.tokens import codebook_stats
from pipeline.tokens.layout import plan_layout
from pipeline.tokens.store import ArraySpec, TokenStore, describe_store

SPECS = [ArraySpec("codes", (2, 2), "uint16", 50)]


def test_every_input_shard_owns_whole_zarr_shards_even_when_uneven():
    layout = plan_layout([("a", "train", 10_000), ("b", "train", 3), ("c", "val", 9_999), ("d", "train", 0)], 512)
    assert layout.chunk_rows == 512 and layout.rows_per_zarr_shard == 10_240
    end = 0
    for shard in layout.shards:
        assert shard.row_start == end and shard.row_start % layout.rows_per_zarr_shard == 0
        assert shard.capacity % layout.rows_per_zarr_shard == 0 and shard.capacity >= shard.count
        end += shard.capacity
    assert layout.rows == end


def test_a_billion_samples_make_about_100k_objects_per_array():
    # img2dataset's default: 10,000 samples per shard; 16x16 uint16 codes per sample.
    layout = plan_layout([("s", "train", 10_000)] * 100, 16 * 16 * 2)
    objects_per_billion = 1e9 / 10_000 * (layout.shards[0].capacity // layout.rows_per_zarr_shard)
    assert objects_per_billion <= 100_000


def test_input_shards_bigger_than_a_zarr_shard_span_several():
    layout = plan_layout([("big", "train", 3_000_000), ("small", "train", 5)], 32 * 32 * 4)
    assert layout.rows_per_zarr_shard * 4096 <= 256 * 1024 * 1024  # an object stays <= 256 MiB
    assert layout.shards[0].capacity // layout.rows_per_zarr_shard > 1


def _write(store, layout, shard, codes, keys):
    writer = store.writer(shard, layout.rows_per_zarr_shard, SPECS)
    for i in range(0, len(keys), 3):
        writer.append({"codes": codes[i : i + 3], "keys": np.array(keys[i : i + 3], dtype=object),
                       "labels": np.arange(i, min(i + 3, len(keys)))})
    return writer.close()


def test_rewriting_a_region_after_a_killed_attempt_is_byte_identical(tmp_path, monkeypatch):
    import pipeline.tokens.layout as token_layout

    # 4-row chunks, 8-row Zarr shards: a 20-sample input shard spans three Zarr shards.
    monkeypatch.setattr(token_layout, "TARGET_CHUNK_BYTES", 4 * 8)
    monkeypatch.setattr(token_layout, "MAX_SHARD_BYTES", 8 * 8)
    layout = plan_layout([("a", "train", 20), ("b", "train", 6)], 8)
    assert layout.shards[0].capacity == 24 and layout.rows_per_zarr_shard == 8
    codes = np.random.default_rng(0).integers(0, 50, (20, 2, 2)).astype(np.uint16)
    keys = [f"k{i}" for i in range(20)]
    clean, dirty = TokenStore(str(tmp_path / "clean.zarr")), TokenStore(str(tmp_path / "dirty.zarr"))
    for store in (clean, dirty):
        store.prepare({"model_uri": "m", "weights_sha256": "x"}, layout, SPECS, overwrite=False)
    assert _write(clean, layout, layout.shards[0], codes[:18], keys[:18]) == 18
    # A killed attempt left other data in all three Zarr shards of the region (e.g. before a
    # corrupt sample was known); the rerun must replace every byte of it.
    _write(dirty, layout, layout.shards[0], codes[::-1].copy(), keys[::-1])
    assert _write(dirty, layout, layout.shards[0], codes[:18], keys[:18]) == 18
    assert array_bytes(tmp_path / "clean.zarr") == array_bytes(tmp_path / "dirty.zarr")
    group = zarr.open_group(str(tmp_path / "clean.zarr"), mode="r")
    assert group["keys"][17] == "k17" and group["keys"][18] == "" and group["labels"][18] == -1
    assert (group["codes"][24:] == 0).all()  # shard b untouched


def test_a_store_from_another_model_is_refused_unless_overwrite(tmp_path):
    layout = plan_layout([("a", "train", 4)], 8)
    store = TokenStore(str(tmp_path / "s.zarr"))
    store.prepare({"model_uri": "models:/tok/1", "weights_sha256": "a" * 64}, layout, SPECS, overwrite=False)
    # The same weights through another URI resume fine.
    store.prepare({"model_uri": "models:/tok@champion", "weights_sha256": "a" * 64}, layout, SPECS, overwrite=False)
    with pytest.raises(UserError, match=r"models:/tok/1 \(weights sha256 aaaa.*models:/tok/2 \(weights sha256 bbbb"):
        store.prepare({"model_uri": "models:/tok/2", "weights_sha256": "b" * 64}, layout, SPECS, overwrite=False)
    other = plan_layout([("a", "train", 4), ("b", "train", 4)], 8)
    with pytest.raises(UserError, match="layout"):
        store.prepare({"model_uri": "models:/tok/1", "weights_sha256": "a" * 64}, other, SPECS, overwrite=False)
    store.prepare({"model_uri": "models:/tok/2", "weights_sha256": "b" * 64}, layout, SPECS, overwrite=True)
    assert store.attrs()["lineage"]["model_uri"] == "models:/tok/2"


def test_finalize_merges_markers_into_counts_report_and_describe(tmp_path):
    url = str(tmp_path / "s.zarr")
    layout, _, written = build_store(url, [5, 9, 2], ["train", "val", "train"])
    info = describe_store(url)
    assert info["state"] == "complete" and info["input_shards"] == {"total": 3, "finished": 3}
    assert info["summary"]["splits"] == {"train": 7, "val": 9}
    codes = info["arrays"]["codes"]
    assert codes["dtype"] == "uint16" and codes["shards"][0] == layout.rows_per_zarr_shard
    expected = codebook_stats.count_codes(np.concatenate(written["codes"]), 50)
    np.testing.assert_array_equal(zarr.open_group(url, mode="r")["codebook_counts"][:], expected)
    stats = info["summary"]["codebook"]["codes"]
    assert stats == codebook_stats.summarize(expected) and 1 < stats["perplexity"] <= 50


def test_perplexity_and_usage_of_known_distributions():
    assert codebook_stats.summarize(np.array([5, 5, 5, 5]))["perplexity"] == pytest.approx(4.0)
    one = codebook_stats.summarize(np.array([0, 7, 0, 0]))
    assert one["perplexity"] == pytest.approx(1.0) and one["usage"] == 0.25
    counts = np.array([0, 3, 0, 9])
    np.testing.assert_array_equal(codebook_stats.from_sparse(codebook_stats.to_sparse(counts), 4), counts)
