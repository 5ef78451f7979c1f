"""The token store as other tools see it (plain zarr, xarray), and its creation protocol without
Ray: a half-created store is completed by a rerun, an old or foreign folder is refused clearly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers.tokens import build_store

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.faults import InjectedFault
from tokenmill.pipeline.tokens.dataset import TokenDataset
from tokenmill.pipeline.tokens.layout import plan_layout
from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore

COUNTS, SPLITS = [5, 0, 9, 3], ["train", "train", "val", "train"]
SPECS = [ArraySpec("codes", (2, 2), "uint16", 50)]
LINEAGE = {"model_uri": "m", "weights_sha256": "a" * 64, "mode": "codes"}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_zarr_and_xarray_open_a_finished_store_without_warnings_and_valid_selects_the_items(tmp_path):
    import xarray as xr

    url = str(tmp_path / "s.zarr")
    _, _, written = build_store(url, COUNTS, SPLITS, levels=2)
    good = sum(COUNTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "not recognized as a component", consolidated fallback, ...
        group = zarr.open_group(url, mode="r")
        nodes = dict(group.members(max_depth=None))
        listed = dict(zarr.open_group(url, mode="r", use_consolidated=False).members(max_depth=None))
        ds = xr.open_zarr(url)
        table = xr.open_zarr(url, group="shards")
    assert {"codes_0", "codes_1", "keys", "labels", "valid", "shards/count"} <= set(nodes)
    assert {f"markers/{i:06d}" for i in range(len(COUNTS))} <= set(listed)  # real nodes, listed when asked
    for name, node in nodes.items():
        if isinstance(node, zarr.Array):
            assert node.metadata.dimension_names is not None and None not in node.metadata.dimension_names, name
    assert ds["codes_0"].dims == ("sample", "h_0", "w_0") and ds["codes_1"].dims == ("sample", "h_1", "w_1")
    assert ds.sizes["sample"] > good and table["count"].dims == ("input_shard",)
    assert int(ds["valid"].sum()) == good and table["count"].values.tolist() == COUNTS

    # The README's one-liners: the valid rows, in zarr and in xarray, are TokenDataset's items.
    zarr_rows = np.concatenate([group[n].oindex[group["valid"][:]].reshape(good, -1) for n in ("codes_0", "codes_1")], 1)
    picked = ds.isel(sample=ds["valid"])
    xr_rows = np.concatenate([picked[n].values.reshape(good, -1) for n in ("codes_0", "codes_1")], 1)
    items = TokenDataset(url, split=None).batch(np.arange(good))
    np.testing.assert_array_equal(zarr_rows, items["tokens"].numpy())
    np.testing.assert_array_equal(xr_rows, items["tokens"].numpy())
    np.testing.assert_array_equal(picked["labels"].values, items["labels"].numpy())
    expected_keys = [f"s{i}-{j}" for i, n in enumerate(COUNTS) for j in range(n)]
    assert picked["keys"].values.tolist() == expected_keys
    np.testing.assert_array_equal(zarr_rows[:5, :4], written["codes_0"][0].reshape(5, -1))


def test_a_half_created_store_is_completed_by_a_plain_rerun(tmp_path, monkeypatch):
    layout = plan_layout([("a", "train", 6), ("b", "val", 3)], 8)
    clean = tmp_path / "clean.zarr"
    TokenStore(str(clean)).prepare(LINEAGE, layout, SPECS, overwrite=False)

    crashed = TokenStore(str(tmp_path / "crashed.zarr"))
    monkeypatch.setenv("TOKENMILL_FAULTS", "store.create")  # dies before the root (the commit)
    with pytest.raises(InjectedFault):
        crashed.prepare(LINEAGE, layout, SPECS, overwrite=False)
    monkeypatch.delenv("TOKENMILL_FAULTS")
    assert not crashed.exists() and (tmp_path / "crashed.zarr" / "codes" / "zarr.json").exists()
    with pytest.raises(UserError, match="half-created token store .*rerun the same `tokenmill tokenize`"):
        TokenStore(crashed.url).token_attrs()
    # Another model may not take it over silently; the same run completes it.
    other = dict(LINEAGE, model_uri="other", weights_sha256="b" * 64)
    with pytest.raises(UserError, match=r"being created by another run \(model m .*died.*--overwrite"):
        TokenStore(crashed.url).prepare(other, layout, SPECS, overwrite=False)
    TokenStore(crashed.url).prepare(LINEAGE, layout, SPECS, overwrite=False)
    assert files(tmp_path / "crashed.zarr") == files(clean)
    TokenStore(crashed.url).prepare(other, layout, SPECS, overwrite=True)
    assert TokenStore(crashed.url).attrs()["lineage"]["model_uri"] == "other"


def test_old_and_foreign_folders_are_refused_with_what_to_do(tmp_path):
    layout = plan_layout([("a", "train", 6)], 8)
    # A format-1 store left "open" without its arrays (two drivers raced an older tokenmill).
    old = tmp_path / "old.zarr"
    zarr.create_group(str(old), attributes={"tokenmill": {"format": 1, "state": "open"}, "lineage": LINEAGE})
    with pytest.raises(UserError, match=r"format 1, older .*pass --overwrite"):
        TokenStore(str(old)).prepare(LINEAGE, layout, SPECS, overwrite=False)
    TokenStore(str(old)).prepare(LINEAGE, layout, SPECS, overwrite=True)
    assert json.loads((old / "zarr.json").read_text())["attributes"]["tokenmill"]["format"] == 3

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"png")
    with pytest.raises(UserError, match=r"holds other files \(e.g. cat.png\) but no token store.*--overwrite"):
        TokenStore(str(foreign)).prepare(LINEAGE, layout, SPECS, overwrite=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.png"]


def test_dimension_names_of_levels_latents_and_augmentation_variants():
    from tokenmill.pipeline.tokens.store_nodes import dimension_names

    assert dimension_names(ArraySpec("codes_1", (8, 8), "uint16", 512)) == ("sample", "h_1", "w_1")
    assert dimension_names(ArraySpec("latents", (16,), "float16")) == ("sample", "latent")
    assert dimension_names(ArraySpec("latents", (4, 8, 8), "float16")) == ("sample", "channel", "h", "w")
    assert dimension_names(ArraySpec("codes", (2, 4, 4), "uint16", 64), variants=2) == ("sample", "variant", "h", "w")
