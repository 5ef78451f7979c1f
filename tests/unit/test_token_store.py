"""Token store layout and writes without Ray: aligned, exactly-once regions, lineage, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from helpers.tokens import array_bytes, build_store

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens import store_code_stats
from tokenmill.pipeline.tokens.dataset import TokenDataset
from tokenmill.pipeline.tokens.layout import MAX_UNITS, plan_layout
from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore, describe_store
from tokenmill.pipeline.tokens.store_nodes import store_objects

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


def test_a_billion_samples_make_at_most_100k_objects_in_all():
    # img2dataset's default: 10,000 samples per shard; 16x16 uint16 codes per sample.
    layout = plan_layout([(f"s{i}", "train", 10_000) for i in range(100_000)], 16 * 16 * 2)
    assert len(layout.units) <= MAX_UNITS and layout.shards_per_unit == 7
    assert all(unit.capacity == layout.rows_per_zarr_shard for unit in layout.units[:-1])  # one object per array
    objects = store_objects(layout, [ArraySpec("codes", (16, 16), "uint16", 16_384)])
    assert objects["total"] <= 100_000 and objects["markers"] == len(layout.units)


def test_few_input_shards_are_one_unit_each_and_many_are_grouped_in_order():
    few = plan_layout([("a", "train", 5), ("b", "val", 3)], 8)
    assert [[s.url for s in u.shards] for u in few.units] == [["a"], ["b"]] and "shards_per_unit" not in few.to_dict()
    many = plan_layout([(f"s{i}", "train", 4 + i % 3) for i in range(7)], 8, max_units=3)
    assert [[s.index for s in u.shards] for u in many.units] == [[0, 1, 2], [3, 4, 5], [6]]
    assert many.to_dict()["shards_per_unit"] == 3  # another grouping cannot resume this store
    end = 0
    for unit in many.units:
        assert unit.row_start == end and unit.row_start % many.rows_per_zarr_shard == 0
        inner = unit.shards[:-1]
        assert all(s.capacity == s.count for s in inner)  # packed: only the unit's tail is padding
        assert unit.shards[-1].capacity >= unit.shards[-1].count and unit.capacity % many.rows_per_zarr_shard == 0
        end += unit.capacity
    assert many.rows == end


def test_the_object_count_is_what_a_real_grouped_store_holds(tmp_path):
    url = tmp_path / "grouped.zarr"
    layout, specs, _ = build_store(str(url), [5, 9, 2, 7, 0, 3], ["train"] * 4 + ["val"] * 2, max_units=2)
    assert layout.shards_per_unit == 3
    on_disk = sum(1 for p in url.rglob("*") if p.is_file())
    assert on_disk == store_objects(layout, specs)["total"]
    assert len(list((url / "markers").glob("*/zarr.json"))) == 2


def test_grouped_and_ungrouped_stores_hold_the_same_items(tmp_path):
    counts, splits = [5, 9, 2, 7, 0, 3], ["train", "val", "train", "train", "val", "train"]
    build_store(str(tmp_path / "one.zarr"), counts, splits)
    build_store(str(tmp_path / "grouped.zarr"), counts, splits, max_units=2)
    for split in ("train", "val"):
        one, grouped = (TokenDataset(str(tmp_path / name), split=split) for name in ("one.zarr", "grouped.zarr"))
        assert len(one) == len(grouped) == sum(n for n, s in zip(counts, splits) if s == split)
        items = np.arange(len(one))
        np.testing.assert_array_equal(one.batch(items)["tokens"], grouped.batch(items)["tokens"])
        np.testing.assert_array_equal(one.labels, grouped.labels)
    group = zarr.open_group(str(tmp_path / "grouped.zarr"), mode="r")
    rows = TokenStore(str(tmp_path / "grouped.zarr")).item_rows()
    assert group["valid"][:].sum() == sum(counts) and group["valid"][:][rows].all()
    assert "" not in group["keys"][:][rows]


def test_input_shards_bigger_than_a_zarr_shard_span_several():
    layout = plan_layout([("big", "train", 3_000_000), ("small", "train", 5)], 32 * 32 * 4)
    assert layout.rows_per_zarr_shard * 4096 <= 256 * 1024 * 1024  # an object stays <= 256 MiB
    assert layout.shards[0].capacity // layout.rows_per_zarr_shard > 1


def _write(store, layout, unit, codes, keys):
    writer = store.writer(unit, layout.rows_per_zarr_shard, SPECS)
    for i in range(0, len(keys), 3):
        writer.append({"codes": codes[i : i + 3], "keys": np.array(keys[i : i + 3], dtype=object),
                       "labels": np.arange(i, min(i + 3, len(keys)))})
    [rows] = writer.close()
    return rows


def test_rewriting_a_region_after_a_killed_attempt_is_byte_identical(tmp_path, monkeypatch):
    import tokenmill.pipeline.tokens.layout as token_layout

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
    assert _write(clean, layout, layout.units[0], codes[:18], keys[:18]) == 18
    # A killed attempt left other data in all three Zarr shards of the region (e.g. before a
    # corrupt sample was known); the rerun must replace every byte of it.
    _write(dirty, layout, layout.units[0], codes[::-1].copy(), keys[::-1])
    assert _write(dirty, layout, layout.units[0], codes[:18], keys[:18]) == 18
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
    expected = store_code_stats.count_codes(np.concatenate(written["codes"]), 50)
    np.testing.assert_array_equal(zarr.open_group(url, mode="r")["codebook_counts"][:], expected)
    stats = info["summary"]["codebook"]["codes"]
    assert stats == store_code_stats.summarize(expected) and 1 < stats["perplexity"] <= 50


def test_perplexity_and_usage_of_known_distributions():
    assert store_code_stats.summarize(np.array([5, 5, 5, 5]))["perplexity"] == pytest.approx(4.0)
    one = store_code_stats.summarize(np.array([0, 7, 0, 0]))
    assert one["perplexity"] == pytest.approx(1.0) and one["usage"] == 0.25
    counts = np.array([0, 3, 0, 9])
    np.testing.assert_array_equal(store_code_stats.from_sparse(store_code_stats.to_sparse(counts), 4), counts)
