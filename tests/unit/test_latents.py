"""Latent stores without Ray: `LatentDataset` (groups, both read paths, samplers, per-epoch
augmentation variants, also in `TokenDataset`) and the `diffusers:` reference's refusals.
(That `LatentDataset` imports neither Ray nor MLflow: tests/system/test_layout.py, in a fresh interpreter.)"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from helpers.tokens import LATENT_GROUPS as GROUPS
from helpers.tokens import build_latent_store, build_store

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.dataset import TokenDataset
from tokenmill.pipeline.tokens.latent_dataset import LatentDataset


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    plain, augmented = str(root / "plain.zarr"), str(root / "flip.zarr")
    return {"plain": (plain, build_latent_store(plain)), "flip": (augmented, build_latent_store(augmented, 2))}


def test_items_are_float_groups_and_labels_of_the_split(stores):
    url, written = stores["plain"]
    ds = LatentDataset(url, split="train")
    assert len(ds) == 17 and ds.names == list(GROUPS) and ds.shapes == GROUPS
    item = ds[13]  # second sample of shard 1
    assert item["latents_4x4"].dtype == torch.float32 and item["latents_4x4"].shape == (3, 4, 4)
    np.testing.assert_array_equal(item["latents_2x2"].numpy(), written["latents_2x2"][13].astype(np.float32))
    assert item["label"].item() == 1
    val = LatentDataset(url, split="val")
    np.testing.assert_array_equal(val[0]["latents_4x4"].numpy(), written["latents_4x4"][17].astype(np.float32))
    chunked = LatentDataset(url, split="train", cache_bytes=1)
    assert ds.resident and not chunked.resident
    idx = np.random.default_rng(0).integers(0, len(ds), 50)
    torch.testing.assert_close(ds.batch(idx), chunked.batch(idx))


def test_distributed_sampler_covers_every_item_once_and_pickles_without_cache(stores):
    url, _ = stores["plain"]
    ds = LatentDataset(url, split=None)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        for batch in torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler):
            assert batch["latents_2x2"].shape[1:] == (3, 2, 2) and batch["label"].dtype == torch.int64
            seen.extend(batch["latents_2x2"].flatten(1).sum(1).tolist())
    assert len(seen) == 26 and len(set(seen)) == 26  # 26 items over 2 ranks, none padded or repeated
    ds.batch([0])
    assert pickle.loads(pickle.dumps(ds))._rows_all is None


def test_augmented_store_gives_one_variant_per_item_and_epoch(stores):
    url, written = stores["flip"]
    ds, chunked = LatentDataset(url, split=None, seed=3), LatentDataset(url, split=None, seed=3, cache_bytes=1)
    assert ds.variants == 2 and ds.shapes["latents_4x4"] == (3, 4, 4)
    idx = np.arange(len(ds))
    picks = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        chunked.set_epoch(epoch)
        batch = ds.batch(idx)
        torch.testing.assert_close(batch, chunked.batch(idx))
        stored = written["latents_4x4"].astype(np.float32)  # (N, 2, 3, 4, 4)
        is_first = (batch["latents_4x4"].numpy() == stored[:, 0]).all((1, 2, 3))
        is_second = (batch["latents_4x4"].numpy() == stored[:, 1]).all((1, 2, 3))
        assert (is_first ^ is_second).all()  # exactly one stored variant per item
        # every array of an item takes the same variant
        both = (batch["latents_2x2"].numpy() == written["latents_2x2"].astype(np.float32)[:, 1]).all((1, 2, 3))
        np.testing.assert_array_equal(both, is_second)
        picks.append(is_second)
    assert 0 < picks[0].mean() < 1 and (picks[0] != picks[1]).any()  # mixed within, and across epochs
    ds.set_epoch(0)
    np.testing.assert_array_equal((ds.batch(idx)["latents_4x4"].numpy() == stored[:, 1]).all((1, 2, 3)), picks[0])


def test_token_dataset_picks_variants_of_augmented_code_stores(tmp_path):
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore

    url = str(tmp_path / "codes.zarr")
    spec = ArraySpec("codes", (2, 2, 2), "uint16", 10)
    layout = plan_layout([("s.tar", "train", 6)], spec.row_bytes)
    store = TokenStore(url)
    store.prepare({"model_uri": "t", "weights_sha256": "0", "augment": {"name": "flip", "variants": 2}},
                  layout, [spec], overwrite=False)
    codes = np.stack([np.zeros((6, 2, 2)), np.ones((6, 2, 2))], axis=1).astype(np.uint16)  # variant v is all v
    writer = store.writer(layout.units[0], layout.rows_per_zarr_shard, [spec])
    writer.append({"codes": codes, "keys": np.array(list("abcdef"), dtype=object), "labels": np.zeros(6, np.int64)})
    [rows] = writer.close()
    store.write_marker(layout.units[0], [{"rows": rows, "corrupt": [],
                                          "code_counts": {"codes": {"codes": [0, 1], "counts": [24, 24]}}}])
    store.finalize(layout, [spec])
    ds = TokenDataset(url, add_bos=True)
    assert ds.seq_len == 1 + 4
    tokens = ds.batch(np.arange(6))["tokens"]
    assert (tokens[:, 0] == 10).all() and set(tokens[:, 1].tolist()) == {0, 1}
    assert (tokens[:, 1:] == tokens[:, 1:2]).all()  # one variant per item, not a mix


def test_readers_name_the_other_reader(stores, tmp_path):
    url, _ = stores["plain"]
    with pytest.raises(UserError, match="holds latents.*LatentDataset"):
        TokenDataset(url)
    codes = str(tmp_path / "codes.zarr")
    build_store(codes, [3], ["train"])
    with pytest.raises(UserError, match="holds codes.*TokenDataset"):
        LatentDataset(codes)


def test_diffusers_references_that_are_missing_or_not_an_autoencoder(tmp_path, monkeypatch):
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, resolve_tokenizer

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    cases = [
        (f"diffusers:{tmp_path}/missing", "is not a folder"),
        (f"diffusers:{tmp_path}", "no config.json"),
        (f"diffusers:{unet}", "is a UNet2DModel, not a VQModel, AutoencoderKL or AutoencoderDC"),
        (f"diffusers:{pickled}", "diffusion_pytorch_model.safetensors is missing"),
        ("diffusers:acme/no-such-vae", "acme/no-such-vae is not in the local Hugging Face cache"),
    ]
    for ref, message in cases:
        with pytest.raises(UserError, match=message):
            resolve_tokenizer(ref)
    with pytest.raises(UserError, match="--latents 'median'"):
        ExtractionOptions.build("median")


def test_without_diffusers_the_error_names_the_extra(monkeypatch):
    import sys

    from tokenmill.pipeline.tokens.diffusers_adapter import import_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed: `import diffusers` fails
    with pytest.raises(UserError, match=r'pip install "tokenmill\[diffusers\]"'):
        import_diffusers()


