"""Lineage that resolves anywhere, with the store, the tokenizer and the prior on the S3 test
server: `tokenize --model models:/NAME/1` against an MLflow server records the tokenizer's S3
folder, its MLflow artifact URI and the registry; then, from another folder and with no tracking
flag nor MLFLOW_TRACKING_URI, decode, sample and train-prior find it (the S3 folder first; once
that is gone, the artifact copy through the recorded server). The resolution order and messages
in process: tests/unit/test_lineage_resolver.py."""

from __future__ import annotations

import time

import mlflow
import pytest
from helpers import CONFIGS
from helpers.tokens import make_vqvae, write_shards

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.registry import tracking
from tokenmill.pipeline.registry.model_ref import MODEL_DIR_TAG


def _put_folder(fs, local, url: str) -> None:
    for path in sorted(p for p in local.iterdir() if p.is_file()):
        fs.put_file(str(path), f"{url}/{path.name}")


def test_store_tokenizer_and_prior_on_s3_resolve_from_another_folder_without_a_tracking_flag(
        ray_local, mlflow_server, s3_server, s3_bucket, tmp_path, monkeypatch, capsys):
    import s3fs

    from tokenmill.models import save_model
    from tokenmill.models.prior import PriorConfig, TransformerPrior
    from tokenmill.pipeline.prior.config import load_prior_config
    from tokenmill.pipeline.prior.lineage import prior_lineage, write_prior_lineage
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.training.tasks.prior import PriorTask

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    # The tokenizer: a folder on S3, registered on the MLflow server (which holds its own copy)
    # with the version tag training sets on the folder it exported to.
    local = make_vqvae(tmp_path / "tok")  # 16 px, 4x4 codes of 64
    model_url = f"{s3_bucket}/models/tok"
    _put_folder(fs, local, model_url)
    name = f"s3-tok-{time.time_ns()}"
    client = mlflow.MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(name)).info.run_id
    version = tracking.register_model_dir(mlflow_server, run_id, local, name, tags={MODEL_DIR_TAG: model_url})

    store = f"{s3_bucket}/tokens.zarr"
    shards = write_shards(str(tmp_path / "shards"), tmp_path / "source", n=30)
    summary = tokenize_dataset(f"models:/{name}/{version}", shards, store,
                               TokenizeOptions(batch_size=8, actors=1, tracking_uri=mlflow_server,
                                               storage_options=options))
    source = summary.lineage["model_source"]
    artifact = source["locations"][1]
    assert source["locations"][0] == model_url and artifact.startswith("mlflow-artifacts:")
    assert source["registry"] == {"tracking_uri": mlflow_server, "uri": f"models:/{name}/{version}",
                                  "name": name, "version": version}

    # A prior on S3 whose lineage names the store and its tokenizer.
    prior = TransformerPrior(PriorConfig(codebook_size=64, num_classes=10, grid=[[4, 4]], dim=16, depth=1, heads=2))
    prior_dir = save_model(prior, tmp_path / "prior")
    write_prior_lineage(prior_dir, prior_lineage(store, summary.lineage, prior.config.vocab(), [[4, 4]]))
    prior_url = f"{s3_bucket}/priors/p"
    _put_folder(fs, prior_dir, prior_url)

    elsewhere = tmp_path / "elsewhere"  # no runs/mlflow.db, no flag, no MLFLOW_TRACKING_URI
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()

    def said(prefix: str) -> str:
        return next(line for line in capsys.readouterr().err.splitlines() if line.startswith(prefix))

    assert cli_main(["decode", store, "--out", str(tmp_path / "decoded"), "--rows", "0:8"]) == 0
    assert said("model: ") == f"model: {model_url} (recorded location, weights sha256 matches)"
    assert cli_main(["sample", "--prior", prior_url, "--n", "1", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    assert said("tokenizer: ") == f"tokenizer: {model_url} (recorded location, weights sha256 matches)"
    # (s3fs reaches the test server through the AWS_* variables tests/conftest.py exports.)
    config = load_prior_config(CONFIGS / "debug_prior.yaml", [f"data.store={store}", f"run.root={tmp_path / 'runs'}"])
    task = PriorTask(config)
    task.prepare(tracking.resolve_tracking_uri(None, config.run.root))  # the run's own store holds no tokenizer
    assert task.found.where == model_url

    # The S3 folder is gone: the MLflow server's copy, through the registry the lineage records.
    fs.rm(model_url, recursive=True)
    assert cli_main(["decode", store, "--out", str(tmp_path / "decoded-again"), "--rows", "0:8"]) == 0
    assert said("model: ") == f"model: {artifact} (recorded location, weights sha256 matches)"
    assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "mlruns").exists()


@pytest.fixture(autouse=True)
def _unset_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
