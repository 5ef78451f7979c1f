"""TokenDataset: raster-order sequences, BOS / class tokens, both read paths, samplers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers.tokens import build_store

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.dataset import TokenDataset

COUNTS, SPLITS = [30, 7, 19, 5], ["train", "train", "val", "train"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("tokds") / "store.zarr")
    _, _, written = build_store(url, COUNTS, SPLITS, levels=2)
    return url, written


def _expected(written, split):
    picked = [i for i, s in enumerate(SPLITS) if s == split]
    levels = [np.concatenate([written[name][i] for i in picked]) for name in sorted(written)]
    return np.concatenate([lv.reshape(len(lv), -1) for lv in levels], axis=1).astype(np.int64)


def test_items_are_raster_order_codes_of_the_split_with_levels_concatenated(store):
    url, written = store
    ds = TokenDataset(url, split="train")
    expected = _expected(written, "train")
    assert len(ds) == 30 + 7 + 5 and ds.seq_len == 4 + 16
    for i in (0, 29, 30, 36, 41, -1):
        np.testing.assert_array_equal(ds[i]["tokens"].numpy(), expected[i])
    assert ds[31]["label"].item() == 1  # second sample of shard 1: label j % 7
    assert len(TokenDataset(url, split="val")) == 19 and len(TokenDataset(url, split=None)) == 61


def test_bos_and_class_tokens_extend_the_vocabulary(store):
    url, written = store
    ds = TokenDataset(url, split="val", add_bos=True, class_token=True)
    assert ds.num_classes == 7 and ds.vocab_size == 50 + 1 + 8
    batch = ds.batch([0, 3])
    assert batch["tokens"].shape == (2, 2 + 20) and batch["tokens"].dtype == torch.int64
    np.testing.assert_array_equal(batch["tokens"][:, 0].numpy(), [50, 50])
    np.testing.assert_array_equal(batch["tokens"][:, 1].numpy(), 51 + np.array([0, 3]))
    np.testing.assert_array_equal(batch["tokens"][:, 2:].numpy(), _expected(written, "val")[[0, 3]])


def test_chunk_cache_path_equals_the_resident_path(store):
    url, _ = store
    resident = TokenDataset(url, split="train")
    chunked = TokenDataset(url, split="train", cache_bytes=1)  # forces the LRU chunk path
    assert resident.resident and not chunked.resident
    idx = np.random.default_rng(0).integers(0, len(resident), 100)
    torch.testing.assert_close(resident.batch(idx), chunked.batch(idx))
    n = len(resident)
    for ds in (resident, chunked):  # negative items count from the end; out of range is an IndexError
        torch.testing.assert_close(ds.batch([-1, -n]), resident.batch([n - 1, 0]))
        for bad in ([n], [-n - 1]):
            with pytest.raises(IndexError):
                ds.batch(bad)


def test_distributed_sampler_and_dataloader_cover_every_item_once(store):
    url, _ = store
    ds = TokenDataset(url, split="train")
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler)
        for batch in loader:
            assert batch["tokens"].shape[1] == ds.seq_len
            seen.extend(batch["tokens"][:, :4].tolist())
    assert len(seen) == 42  # 42 items split evenly over 2 ranks, none padded
    ds.batch([0])
    assert pickle.loads(pickle.dumps(ds))._rows_all is None  # workers do not receive the cache


def test_unfinished_store_and_unknown_split_are_user_errors(store, tmp_path):
    from tokenmill.pipeline.tokens.store import TokenStore

    url, _ = store
    with pytest.raises(UserError, match="no 'holdout' samples"):
        TokenDataset(url, split="holdout")
    partial = tmp_path / "partial.zarr"
    build_store(str(partial), [3], ["train"])
    group = TokenStore(str(partial)).open_group("r+")
    group.attrs["tokenmill"] = {"format": 1, "state": "open"}
    with pytest.raises(UserError, match="not a finished token store"):
        TokenDataset(str(partial))
