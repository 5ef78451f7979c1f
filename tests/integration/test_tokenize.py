"""`tokenize` end to end on local Ray: exactly once under actor kills, uneven shards, corrupt
members, s3:// against moto, lineage refusal, codes that decode to reconstructions, latents of
VAEs, model references through a real MLflow server. (Killed drivers and two drivers at once, as
processes: tests/system/test_tokenize_processes.py.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers.tokens import (
    TOKENIZE_IMAGES,
    array_bytes,
    images,
    make_hvae,
    make_vae,
    make_vqvae,
    write_shards,
)

from tokenmill.models.errors import UserError

N = TOKENIZE_IMAGES  # in the shared `tokenize_inputs` (conftest)


def test_store_is_plain_zarr_and_decodes_to_reconstructions(tokenize_inputs, uninterrupted_store):
    from tokenmill.models import load_model

    summary = uninterrupted_store["summary"]
    assert summary.samples == N - 1  # one planted corrupt image; the image-less sample is not one
    assert 0 < summary.startup_s < summary.seconds  # actors start, then shards run
    group = zarr.open_group(str(uninterrupted_store["store"]), mode="r")
    assert group["codes"].dtype == np.uint16 and group["codes"].shape[1:] == (4, 4)
    assert group.attrs["lineage"]["codebook_size"] == 64
    counts = group["shards/count"][:]
    starts, caps = group["shards/row_start"][:], group["shards/capacity"][:]
    assert len(set(counts.tolist())) > 1  # uneven input shards
    assert (starts % group["codes"].shards[0] == 0).all() and (caps % group["codes"].shards[0] == 0).all()
    reported = {(c["key"], Path(c["shard"]).name) for c in group["report"].attrs["corrupt"]}
    first = sorted(Path(tokenize_inputs["shards"]).glob("train-*.tar"))[0].name
    assert reported == {(tokenize_inputs["corrupt"][0], first), (tokenize_inputs["corrupt"][1], first)}

    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)])
    keys = group["keys"][:][rows]
    assert "" not in keys and tokenize_inputs["corrupt"][0] not in keys and len(set(keys.tolist())) == N - 1
    source = images(N)
    index = np.array([int(k.rsplit("-", 1)[1]) for k in keys])
    np.testing.assert_array_equal(group["labels"][:][rows], index % 10)
    model = load_model(tokenize_inputs["model"]).eval()
    x = torch.from_numpy(source[index]).permute(0, 3, 1, 2).float() / 255.0
    codes = torch.from_numpy(group["codes"][:][rows].astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(codes), model(x).recon)
    counts_k = group["codebook_counts"][:]
    assert counts_k.sum() == codes.numel() and summary.codebook["codes"]["used_codes"] > 1


def test_rerun_of_a_finished_store_encodes_nothing(tokenize_inputs, uninterrupted_store):
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    before = array_bytes(uninterrupted_store["store"])
    summary = tokenize_dataset(tokenize_inputs["model"], tokenize_inputs["shards"], str(uninterrupted_store["store"]),
                               TokenizeOptions(batch_size=4))
    assert summary.encoded_now == 0 and summary.skipped_shards == summary.input_shards
    assert array_bytes(uninterrupted_store["store"]) == before


def test_relative_paths_reach_the_actors_of_a_running_ray(tokenize_inputs, uninterrupted_store, tmp_path, monkeypatch):
    """The session's Ray workers started in another folder: relative --data/--out are made
    absolute before they reach them (as with `ray start` and RAY_ADDRESS set)."""
    import os

    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    monkeypatch.chdir(tmp_path)
    shards = os.path.relpath(tokenize_inputs["shards"], tmp_path)
    summary = tokenize_dataset(tokenize_inputs["model"], shards, "relative.zarr", TokenizeOptions(batch_size=4))
    assert summary.store == str(tmp_path / "relative.zarr") and summary.encoded_now > 0
    assert array_bytes(tmp_path / "relative.zarr") == array_bytes(uninterrupted_store["store"])


def test_inspect_prints_shape_dtype_lineage_and_codebook_stats(
        tokenize_inputs, uninterrupted_store, tmp_path, capsys):
    from tokenmill.jobs.cli import main

    out = tmp_path / "inspect.json"
    assert main(["inspect", str(uninterrupted_store["store"]), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "token_store"
    assert result["arrays"]["codes"]["dtype"] == "uint16" and result["arrays"]["codes"]["shape"][1:] == [4, 4]
    assert result["lineage"]["model_uri"] and result["input_shards"]["finished"] == result["input_shards"]["total"]
    assert result["summary"]["codebook"]["codes"]["used_codes"] > 1
    printed = capsys.readouterr().out
    assert "codes: shape" in printed and "weights sha256" in printed


def test_store_from_another_model_is_refused(tokenize_inputs, uninterrupted_store, tmp_path):
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset

    other = make_vqvae(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match=r"was made by .*model.*this run uses .*other.*--overwrite"):
        tokenize_dataset(str(other), tokenize_inputs["shards"], str(uninterrupted_store["store"]))


def test_an_encoding_actor_dying_mid_shard_is_retried_to_identical_arrays(
        tokenize_inputs, uninterrupted_store, tmp_path, monkeypatch):
    from tokenmill.pipeline.runtime import faults
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    flag = tmp_path / "crashed"
    monkeypatch.setenv(faults.ENV, f"tokenize.before_marker,unit=2,action=exit,once={flag}")
    store = tmp_path / "actor-crash.zarr"
    tokenize_dataset(tokenize_inputs["model"], tokenize_inputs["shards"], str(store),
                     TokenizeOptions(batch_size=4, actors=2))
    assert flag.exists()  # the actor really died after writing shard 2's rows, before its marker
    assert array_bytes(store) == array_bytes(uninterrupted_store["store"])


def test_grouped_work_units_hold_the_same_items_after_an_actor_dies(
        tokenize_inputs, uninterrupted_store, tmp_path, monkeypatch):
    """Stores of very many input shards group them into work units (one writer, one marker
    each); three units here. A unit's actor dies after its rows, before its marker: the retry
    ends with the reference's items in item order."""
    import tokenmill.pipeline.tokens.layout as layout
    from tokenmill.pipeline.runtime import faults
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.dataset import TokenDataset

    monkeypatch.setattr(layout, "MAX_UNITS", 3)
    flag = tmp_path / "crashed"
    monkeypatch.setenv(faults.ENV, f"tokenize.before_marker,unit=1,action=exit,once={flag}")
    store = tmp_path / "grouped.zarr"
    summary = tokenize_dataset(tokenize_inputs["model"], tokenize_inputs["shards"], str(store),
                               TokenizeOptions(batch_size=4, actors=2))
    assert flag.exists() and summary.samples == uninterrupted_store["summary"].samples
    assert len(list((store / "markers").glob("*/zarr.json"))) == 3
    assert zarr.open_group(str(store), mode="r").attrs["layout"]["shards_per_unit"] > 1
    assert summary.codebook == uninterrupted_store["summary"].codebook
    for split in ("train", "val"):
        grouped = TokenDataset(str(store), split=split)
        ref = TokenDataset(str(uninterrupted_store["store"]), split=split)
        items = np.arange(len(ref))
        assert len(grouped) == len(ref)
        np.testing.assert_array_equal(grouped.batch(items)["tokens"], ref.batch(items)["tokens"])
    reported = zarr.open_group(str(store), mode="r")["report"].attrs["corrupt"]
    assert reported == zarr.open_group(str(uninterrupted_store["store"]), mode="r")["report"].attrs["corrupt"]


def test_s3_shards_and_store(tokenize_inputs, uninterrupted_store, s3_server, s3_bucket, tmp_path):
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    options = s3_server["storage_options"]
    shards = write_shards(f"{s3_bucket}/shards", tmp_path / "source", n=N, storage_options=options)
    store = f"{s3_bucket}/tokens.zarr"
    summary = tokenize_dataset(tokenize_inputs["model"], shards, store,
                               TokenizeOptions(batch_size=8, actors=2, storage_options=options))
    assert summary.samples == N  # these shards carry no planted corruption
    remote = zarr.open_group(store, mode="r", storage_options=options)
    local = zarr.open_group(str(uninterrupted_store["store"]), mode="r")
    keep = local["keys"][:] != ""
    same_rows = np.isin(remote["keys"][:], local["keys"][:][keep]) & (remote["keys"][:] != "")
    np.testing.assert_array_equal(np.sort(remote["keys"][:][same_rows]), np.sort(local["keys"][:][keep]))
    by_key = dict(zip(remote["keys"][:][same_rows].tolist(), remote["codes"][:][same_rows]))
    for key, codes in zip(local["keys"][:][keep].tolist(), local["codes"][:][keep]):
        np.testing.assert_array_equal(by_key[key], codes)


def test_latents_for_vae_models(tokenize_inputs, tmp_path):
    from tokenmill.models import load_model
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    model_dir = make_vae(tmp_path / "vae")
    store = tmp_path / "latents.zarr"
    tokenize_dataset(str(model_dir), tokenize_inputs["shards"], str(store),
                     TokenizeOptions(batch_size=8, latents=True, actors=2))
    group = zarr.open_group(str(store), mode="r")
    assert group["latents"].dtype == np.float16 and "codes" not in group
    keys = group["keys"][:]
    rows = np.flatnonzero(keys != "")
    index = np.array([int(k.rsplit("-", 1)[1]) for k in keys[rows]])
    x = torch.from_numpy(images(N)[index]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        mu, _ = load_model(model_dir).eval().encode(x)
    np.testing.assert_array_equal(group["latents"][:][rows], mu.numpy().astype(np.float16))


def test_hierarchical_vae_latents_per_group_read_back_and_decode_to_its_reconstructions(tokenize_inputs, tmp_path):
    from tokenmill.jobs.cli import main
    from tokenmill.models import load_model
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.detokenize import StoreDecoder
    from tokenmill.pipeline.tokens.latent_dataset import LatentDataset

    model_dir = make_hvae(tmp_path / "hvae")
    store = tmp_path / "hvae.zarr"
    tokenize_dataset(str(model_dir), tokenize_inputs["shards"], str(store),
                     TokenizeOptions(batch_size=8, latents=True, actors=1))
    group = zarr.open_group(str(store), mode="r")
    assert [a["name"] for a in group.attrs["arrays"]] == ["latents_4x4", "latents_8x8"]  # coarse -> fine
    assert group["latents_4x4"].dtype == np.float16 and group["latents_8x8"].shape[1:] == (2, 8, 8)
    assert group.attrs["lineage"]["adapter"] == "tokenmill" and len(group.attrs["lineage"]["config_sha256"]) == 64
    ds = LatentDataset(str(store), split=None)
    keys = np.concatenate([group["keys"][:][s : s + n] for s, n in zip(group["shards/row_start"][:],
                                                                       group["shards/count"][:])])
    index = np.array([int(k.rsplit("-", 1)[1]) for k in keys])
    x = torch.from_numpy(images(N)[index]).permute(0, 3, 1, 2).float() / 255.0
    model = load_model(model_dir).eval()
    with torch.no_grad():
        mu, _ = model.encode(x)  # (B, 2*4*4 + 2*8*8), groups coarse -> fine
        recon = model.decode(mu)  # the model's own reconstructions from the posterior means
    batch = ds.batch(np.arange(len(ds)))
    stored = torch.cat([batch["latents_4x4"].flatten(1), batch["latents_8x8"].flatten(1)], dim=1)
    torch.testing.assert_close(stored, mu.half().float(), atol=1e-3, rtol=1e-3)  # float16 rounding
    np.testing.assert_array_equal(batch["labels"].numpy(), index % 10)
    decoded = next(StoreDecoder(str(store)).images(0, len(ds)))
    torch.testing.assert_close(decoded, recon, atol=1e-2, rtol=0)
    assert main(["decode", str(store), "--out", str(tmp_path / "png"), "--rows", "0:8"]) == 0
    assert len(list((tmp_path / "png").glob("grid-*.png"))) == 1


def test_decode_command_writes_png_grids_of_the_reconstructions(tokenize_inputs, uninterrupted_store, tmp_path):
    from PIL import Image

    from tokenmill.jobs.cli import main

    assert main(["decode", str(uninterrupted_store["store"]), "--out", str(tmp_path / "png"), "--rows", "0:70"]) == 0
    grids = sorted((tmp_path / "png").glob("grid-*.png"))
    assert [g.name for g in grids] == ["grid-00000.png"]  # 0:70 clipped to the 45 items
    assert Image.open(grids[0]).size == (8 * 18 + 2, 6 * 18 + 2)  # 8 x 6 tiles of 16 px, 2 px padding
    assert main(["decode", str(uninterrupted_store["store"]), "--out", str(tmp_path / "x"), "--rows", "5:2"]) == 2


def test_model_references_resolve_to_the_same_weights(tmp_path, mlflow_server, monkeypatch):
    import fsspec
    import mlflow

    from tokenmill.pipeline.registry import tracking
    from tokenmill.pipeline.registry.model_ref import resolve_model

    globals_ = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    for variable in globals_:
        monkeypatch.delenv(variable, raising=False)
    model_dir = make_vqvae(tmp_path / "model")
    uri, name = mlflow_server, f"tok-{time.time_ns()}"  # the server is shared by the session
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(name)).info.run_id
    version = tracking.register_model_dir(uri, run_id, model_dir, name, tags={})
    client.set_registered_model_alias(name, "champion", version)
    fs = fsspec.filesystem("memory")
    for file in ("config.json", "model.safetensors"):
        fs.pipe(f"/models/tok/{file}", (model_dir / file).read_bytes())

    local = resolve_model(str(model_dir))
    assert local.version is None
    for ref, expected_version in [(f"runs:/{run_id}/model", None), (f"models:/{name}/1", f"{name}/1"),
                                  (f"models:/{name}@champion", f"{name}/1"), ("memory://models/tok", None)]:
        resolved = resolve_model(ref, tracking_uri=uri)
        assert (resolved.weights_sha256, resolved.version) == (local.weights_sha256, expected_version), ref
    with pytest.raises(UserError, match="neither a directory nor an MLflow URI"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=f"cannot download model models:/{name}-nope/1"):
        resolve_model(f"models:/{name}-nope/1", tracking_uri=uri)
    with pytest.raises(UserError, match=f"cannot download model models:/{name}@nope"):
        resolve_model(f"models:/{name}@nope", tracking_uri=uri)
    # Nothing process-wide was set: a later job in this process keeps its own default store.
    assert not [variable for variable in globals_ if variable in os.environ]
