"""`tokenmill inspect` on every artifact, through the CLI's main in this process: a model folder, MLflow
references (`models:/`, an alias, `runs:/`), the three prior kinds, shards, a token
store, and targets it cannot inspect (exit 2, one line). Lineage keys the code does not know yet are
printed too: tomorrow's lineage fields need no new printing code. (A diffusers folder, and artifacts on
S3: tests/integration/test_diffusers_tokenize.py, which imports diffusers anyway, and test_inspect_s3.py.)"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers.tokens import build_store, make_vqvae, write_shards

from tokenmill.jobs.cli import main
from tokenmill.models import save_model
from tokenmill.models.masked_prior import MaskGITConfig, MaskGITPrior
from tokenmill.models.prior import PriorConfig, TransformerPrior
from tokenmill.models.serialization import WEIGHTS_FILE, load_model
from tokenmill.models.var_prior import VARConfig, VARPrior
from tokenmill.pipeline.prior.lineage import prior_lineage, write_prior_lineage

pytestmark = pytest.mark.usefixtures("one_thread")


def inspect(target: str, tmp_path, capsys, *options: str) -> tuple[dict, str]:
    """`tokenmill inspect TARGET --json …`: the JSON result and what it printed (exit 0 asserted)."""
    out = tmp_path / "inspect.json"
    capsys.readouterr()
    assert main(["inspect", target, "--json", str(out), *options]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_folder_gives_its_class_config_parameters_sha256_and_location(tmp_path, capsys):
    folder = make_vqvae(tmp_path / "vq", codebook_size=32)
    result, printed = inspect(str(folder), tmp_path, capsys)
    expected = sum(p.numel() for p in load_model(folder).parameters())
    assert result["kind"] == "model" and result["class"] == "VQVAE" and result["model_kind"] == "vqvae"
    assert result["parameters"] == expected and result["config"]["quantizer"]["codebook_size"] == 32
    assert result["weights_sha256"] == sha256(folder / WEIGHTS_FILE)
    assert result["tokens"] == {"codebook_size": 32, "token_shape": [[4, 4]]}
    assert result["origin"] == {"location": str(folder.resolve())} and "transform" not in result["extra"]
    assert f"{expected:,} parameters" in printed and result["weights_sha256"] in printed


def test_registry_references_name_their_version_run_and_source(sqlite_tracking, tmp_path, capsys):
    import mlflow

    from tokenmill.pipeline.registry import tracking

    folder = make_vqvae(tmp_path / "vq")
    name = f"inspect-{tmp_path.name}"
    run_id = tracking.get_or_create_run(sqlite_tracking, name, "r1", tags={"tokenmill.task": "tokenizer"},
                                        run_dir=tmp_path)
    version = tracking.register_model_dir(sqlite_tracking, run_id, folder, name, tags={"tokenmill.step": "7"})
    mlflow.MlflowClient(sqlite_tracking).set_registered_model_alias(name, "champion", version)
    for ref in (f"models:/{name}/{version}", f"models:/{name}@champion"):
        result, printed = inspect(ref, tmp_path, capsys, "--tracking-uri", sqlite_tracking)
        origin = result["origin"]
        assert origin["registry"] == {"tracking_uri": sqlite_tracking, "name": name, "version": version}
        assert origin["run_id"] == run_id and origin["source"].endswith("/model") and origin["run_name"] == "r1"
        assert origin["version_tags"] == {"tokenmill.step": "7"} and origin["run_tags"]["tokenmill.task"] == "tokenizer"
        assert result["weights_sha256"] == sha256(folder / WEIGHTS_FILE)
        assert f"registry.name: {name}" in printed and f"run_id: {run_id}" in printed
    result, _ = inspect(f"runs:/{run_id}/model", tmp_path, capsys, "--tracking-uri", sqlite_tracking)
    assert result["origin"]["run_id"] == run_id and "registry" not in result["origin"]
    assert result["class"] == "VQVAE"


PRIORS = {  # kind: (model, grid)
    "ar": (lambda grid: TransformerPrior(PriorConfig(codebook_size=16, num_classes=3, grid=grid, dim=16, depth=1,
                                                      heads=2)), [[2, 2], [4, 4]]),
    "maskgit": (lambda grid: MaskGITPrior(MaskGITConfig(codebook_size=16, num_classes=3, grid=grid, dim=16, depth=1,
                                                         heads=2)), [[4, 4]]),
    "var": (lambda grid: VARPrior(VARConfig(codebook_size=16, num_classes=3, grid=grid, dim=16, depth=1, heads=2,
                                            positions="learned")), [[1, 1], [2, 2], [4, 4]]),
}


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_a_prior_gives_its_kind_vocabulary_grid_store_and_tokenizer(kind, tmp_path, capsys):
    build, grid = PRIORS[kind]
    torch.manual_seed(0)
    prior = build(grid)
    folder = save_model(prior, tmp_path / "prior")
    lineage = prior_lineage("s3://bucket/tokens.zarr", {"model_uri": "models:/tok/3", "weights_sha256": "ab" * 32},
                            prior.config.vocab(), grid)
    write_prior_lineage(folder, {**lineage, "tokenizer_location": "s3://bucket/tok"})  # a key added later
    result, printed = inspect(str(folder), tmp_path, capsys)
    p = result["prior"]
    assert result["kind"] == "prior" and p["kind"] == kind and p["grid"] == grid
    assert p["vocab_size"] == prior.config.vocab_size == prior.embed.num_embeddings
    assert p["store"] == "s3://bucket/tokens.zarr" and p["tokenizer"] == "models:/tok/3"
    assert p.get("scales") == ([1, 2, 4] if kind == "var" else None)
    assert f"prior: {kind}, vocabulary {p['vocab_size']}" in printed and "store s3://bucket/tokens.zarr" in printed
    assert "tokenizer_location: s3://bucket/tok" in printed and "tokenizer_sha256: " + "ab" * 32 in printed


def test_shards_give_counts_splits_image_sizes_and_seed(tmp_path, capsys):
    shards = write_shards(str(tmp_path / "shards"), tmp_path / "source", n=20)
    result, printed = inspect(shards, tmp_path, capsys)
    assert result["kind"] == "shards" and result["samples"] == 20 and result["shards"] == 3
    assert result["splits"] == {"train": {"shards": 2, "samples": 16}, "val": {"shards": 1, "samples": 4}}
    assert result["image_stats"]["height"] == [16, 16] and result["settings"]["seed"] == 0
    assert result["source"].endswith("images.npy") and "seed 0, shuffle True" in printed


def test_a_token_store_gives_rows_levels_completeness_and_every_lineage_key(tmp_path, capsys):
    import zarr

    url = str(tmp_path / "tokens.zarr")
    build_store(url, [5, 3, 4], ["train", "val", "train"], levels=2)
    group = zarr.open_group(url, mode="r+")
    group.attrs.update({"lineage": {**group.attrs["lineage"], "model_registry": {"name": "tok", "version": "3"}}})
    result, printed = inspect(url, tmp_path, capsys)
    assert result["kind"] == "token_store" and result["state"] == "complete"
    assert result["input_shards"] == {"total": 3, "finished": 3} and result["summary"]["samples"] == 12
    assert [level["name"] for level in result["levels"]] == ["codes_0", "codes_1"]
    assert "rows 12 {'train': 9, 'val': 3}" in printed and "levels ['codes_0', 'codes_1']" in printed
    assert "model_registry.name: tok" in printed and "model_registry.version: 3" in printed


def test_what_it_cannot_inspect_is_one_line_and_exit_2(tmp_path, capsys, sqlite_tracking):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')  # diffusers, not an autoencoder
    cases = {  # argv -> what the one line must say
        (str(tmp_path / "missing"),): "does not exist",
        (str(tmp_path / "empty"),): "not something tokenmill can inspect",
        (str(tmp_path / "notes.txt"),): "not something tokenmill can inspect",
        ("models:/no-such-model/1", "--tracking-uri", sqlite_tracking): "no-such-model",
        (f"diffusers:{tmp_path}/missing",): "is not a folder",
        (str(tmp_path / "unet"),): "is a UNet2DModel, not a VQModel, AutoencoderKL or AutoencoderDC",
    }
    for argv, message in cases.items():
        capsys.readouterr()
        assert main(["inspect", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and argv[0] in err and "Traceback" not in err
