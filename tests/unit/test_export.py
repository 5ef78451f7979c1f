"""`tokenmill export`: Megatron indexed datasets read back by megatron-core, Parquet read back by
Hugging Face datasets; every sequence equals TokenDataset's item, lineage travels along."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import torch
import zarr
from helpers.tokens import build_store

from tokenmill.jobs.cli import main
from tokenmill.pipeline.tokens.dataset import TokenDataset

COUNTS, SPLITS = [6, 0, 9, 3, 5], ["train", "train", "val", "train", "val"]


def test_megatron_export_is_read_back_by_megatron_core_as_token_dataset_items(tmp_path):
    with warnings.catch_warnings():  # megatron-core's notes about Transformer Engine and Apex
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    url = str(tmp_path / "s.zarr")
    build_store(url, COUNTS, SPLITS, levels=2)
    prefix = tmp_path / "out" / "tokens"
    summary = tmp_path / "summary.json"
    assert main(["export", url, "--format", "megatron", str(prefix), "--split", "all", "--bos", "--class-token",
                 "--batch-size", "4", "--json", str(summary)]) == 0
    expected = TokenDataset(url, split=None, add_bos=True, class_token=True)
    items = expected.batch(np.arange(len(expected)))["tokens"].numpy()
    megatron = IndexedDataset(str(prefix))
    assert len(megatron) == len(expected) == sum(COUNTS)
    np.testing.assert_array_equal(np.stack([megatron[i] for i in range(len(megatron))]), items)
    np.testing.assert_array_equal(megatron.document_indices, np.arange(len(expected) + 1))
    assert megatron[0].dtype == np.uint16 and items[:, 0].tolist() == [50] * len(items)  # BOS = K
    # Byte for byte what megatron-core's own builder writes for these sequences.
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for row in items:
        builder.add_item(torch.from_numpy(row))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / "out" / f"tokens.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes(), ext
    meta = json.loads((tmp_path / "out" / "tokens.json").read_text())
    assert meta["lineage"] == zarr.open_group(url, mode="r").attrs["lineage"]
    assert meta["bos_id"] == 50 and meta["vocab_size"] == expected.vocab_size and meta["class_ids"]["first"] == 51 and meta["split"] == "all"
    assert json.loads(summary.read_text())["samples"] == sum(COUNTS)


def test_parquet_export_of_one_split_is_read_back_by_datasets(tmp_path):
    import datasets

    url = str(tmp_path / "s.zarr")
    build_store(url, COUNTS, SPLITS, levels=1)
    out = tmp_path / "val.parquet"
    assert main(["export", url, "--format", "parquet", str(out), "--split", "val", "--batch-size", "4"]) == 0
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    expected = TokenDataset(url, split="val")
    items = expected.batch(np.arange(len(expected)))
    assert loaded.num_rows == len(expected) == 14
    np.testing.assert_array_equal(np.array(loaded["tokens"]), items["tokens"].numpy())
    assert loaded["label"] == items["labels"].tolist() and set(loaded["split"]) == {"val"}
    assert loaded["key"] == [f"s2-{j}" for j in range(9)] + [f"s4-{j}" for j in range(5)]
    meta = json.loads(pq.read_schema(out).metadata[b"tokenmill"])
    assert meta["lineage"]["model_uri"] == "test" and meta["bos_id"] is None and meta["store"] == url


def test_an_unfinished_store_or_a_missing_split_is_a_user_error(tmp_path, capsys):
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore

    url = str(tmp_path / "s.zarr")
    TokenStore(url).prepare({"model_uri": "m"}, plan_layout([("a", "train", 3)], 8),
                            [ArraySpec("codes", (2, 2), "uint16", 50)], overwrite=False)
    assert main(["export", url, "--format", "parquet", str(tmp_path / "x.parquet")]) == 2
    assert "not a finished token store" in capsys.readouterr().err
    done = str(tmp_path / "done.zarr")
    build_store(done, [3], ["train"])
    assert main(["export", done, "--format", "megatron", str(tmp_path / "m"), "--split", "val"]) == 2
    assert "no 'val' samples" in capsys.readouterr().err
