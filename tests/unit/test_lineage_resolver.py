"""Lineage that resolves anywhere (`pipeline.registry.resolver`) and the project's one tracking store.

A store's and a prior's lineage record every way to their model (absolute locations, weights
sha256, the registry's tracking URI, name and version); commands try the recorded locations, the
recorded registry, then the current one, say which they used in one line, and when nothing works
name every attempt and the flag that fixes it (exit 2). Older lineages (no source) resolve as
before. Everything here runs in this process, on the session's SQLite MLflow store; the same
with the store and the model on S3: tests/integration/test_lineage_s3.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import zarr
from helpers import CONFIGS
from helpers.engine import PRIOR_K, learnable_store
from helpers.tokens import make_vqvae

from tokenmill.jobs.cli import main as cli_main
from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry import tracking
from tokenmill.pipeline.registry.model_ref import MODEL_DIR_TAG, resolve_model
from tokenmill.pipeline.registry.resolver import Recorded, absolute_location, resolve_recorded, source

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def registered(sqlite_tracking, tmp_path_factory) -> dict:
    """An 8 px tokenizer (2x2 codes, PRIOR_K codes) exported to a folder and registered as version 1
    in the session's SQLite store, as `tokenmill train` does (the version tags its folder)."""
    root = tmp_path_factory.mktemp("registered")
    model_dir = make_vqvae(root / "project" / "runs" / "tok" / "model", codebook_size=PRIOR_K, image_size=8)
    name = f"tok-{time.time_ns()}"
    run_id = tracking.get_or_create_run(sqlite_tracking, "lineage-tests", name, tags={})
    version = tracking.register_model_dir(sqlite_tracking, run_id, model_dir, name,
                                          tags={MODEL_DIR_TAG: str(model_dir.resolve())})
    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    return {"uri": sqlite_tracking, "name": name, "version": version, "ref": f"models:/{name}/{version}",
            "model_dir": model_dir, "sha": sha, "root": root}


def _store(path: Path, tokenizer: Path, **lineage) -> str:
    """A finished learnable store (2x2 codes) whose lineage names `tokenizer`, updated with `lineage`."""
    url = learnable_store(str(path), tokenizer)
    group = zarr.open_group(url, mode="r+")
    group.attrs.update({"lineage": dict(group.attrs["lineage"], **lineage)})
    return url


def _lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# -- recording -------------------------------------------------------------------------------------
def test_a_registry_model_records_its_folder_artifact_and_registry(registered, tmp_path, monkeypatch):
    files = resolve_model(f"models:/{registered['name']}/{registered['version']}", registered["uri"])
    artifact = files.locations[1]
    assert files.locations[0] == str(registered["model_dir"].resolve())  # the exported folder, from the version's tag
    assert artifact.startswith("file://") and artifact.endswith("/artifacts/model")
    # Artifacts sit beside the SQLite file (not under whatever folder the job started in).
    assert artifact.startswith(tracking.sqlite_folder(registered["uri"]).as_uri() + "/mlartifacts/")
    assert files.registry == {"tracking_uri": registered["uri"], "uri": registered["ref"],
                              "name": registered["name"], "version": registered["version"]}
    # A relative path or tracking URI is recorded absolute: it means the same from any folder.
    monkeypatch.chdir(registered["model_dir"].parent.parent)
    local = resolve_model("tok/model")
    assert source(local) == {"locations": [str(registered["model_dir"].resolve())], "registry": None}
    assert tracking.absolute_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{Path.cwd().resolve()}/runs/mlflow.db"
    assert absolute_location("diffusers:tok/model") == f"diffusers:{registered['model_dir'].resolve()}"
    assert absolute_location("s3://bucket/model") == "s3://bucket/model"


# -- the order -------------------------------------------------------------------------------------
def test_locations_then_recorded_registry_then_current_and_a_wrong_sha_falls_through(registered, tmp_path,
                                                                                      monkeypatch, capsys):
    other = make_vqvae(tmp_path / "other", codebook_size=PRIOR_K, seed=1, image_size=8)  # other weights
    gone = f"sqlite:///{tmp_path}/gone/mlflow.db"
    full = source(resolve_model(registered["ref"], registered["uri"]))
    monkeypatch.chdir(tmp_path)  # not the project's folder: no runs/mlflow.db here

    def used(src: dict, tracking_uri: str | None = None) -> tuple[str, str]:
        record = Recorded(registered["ref"], registered["sha"], src, f"{registered['name']}/{registered['version']}")
        said = []
        found = resolve_recorded(record, owner="the store", fix="pass --model", tracking_uri=tracking_uri,
                                 say=said.append)
        assert found.files.weights_sha256 == registered["sha"] and len(said) == 1 and found.where in said[0]
        return found.how, found.where

    # A recorded folder that holds other weights (sha256 differs) is passed over for the next location.
    bad = {"locations": [str(tmp_path / "missing"), str(other)], "registry": full["registry"]}
    assert used({**full, "locations": bad["locations"] + full["locations"]}) == (
        "recorded location", str(registered["model_dir"].resolve()))
    # No location holds the weights: the recorded registry.
    assert used(bad) == ("recorded registry", f"{registered['ref']} in {registered['uri']}")
    # The recorded registry is gone too: the current one (--tracking-uri), and no empty store is created.
    moved = {**bad, "registry": {**full["registry"], "tracking_uri": gone}}
    assert used(moved, registered["uri"]) == ("current registry", f"{registered['ref']} in {registered['uri']}")
    assert not (tmp_path / "gone").exists()
    # ... or, with no flag, this folder's project store (runs/mlflow.db), here a copy of the registry.
    (tmp_path / "runs").mkdir()
    shutil.copy(tracking.sqlite_folder(registered["uri"]) / "mlflow.db", tmp_path / "runs" / "mlflow.db")
    assert used(moved) == ("current registry", f"{registered['ref']} in sqlite:///{tmp_path.resolve()}/runs/mlflow.db")
    assert "registry" not in capsys.readouterr().err  # `say` took the lines


def test_a_location_may_be_any_fsspec_url(registered):
    import fsspec

    fs = fsspec.filesystem("memory")
    for file in ("config.json", "model.safetensors"):
        fs.pipe(f"/lineage-test/tok/{file}", (registered["model_dir"] / file).read_bytes())
    record = Recorded("memory://lineage-test/tok", registered["sha"],
                      {"locations": ["memory://lineage-test/none", "memory://lineage-test/tok"], "registry": None})
    found = resolve_recorded(record, owner="s", fix="f")
    assert (found.where, found.how) == ("memory://lineage-test/tok", "recorded location")
    fs.rm("/lineage-test/tok", recursive=True)
    with pytest.raises(UserError, match=r"tried memory://lineage-test/none \(no model there\); "
                                        r"memory://lineage-test/tok \(no model there\); f$"):
        resolve_recorded(record, owner="s", fix="f")


def test_nothing_works_one_line_names_every_attempt_and_the_flag(registered, tmp_path, monkeypatch, capsys):
    other = make_vqvae(tmp_path / "other", codebook_size=PRIOR_K, seed=1, image_size=8)
    src = {"locations": [str(tmp_path / "missing"), str(other)],
           "registry": {"tracking_uri": f"sqlite:///{tmp_path}/gone/mlflow.db", "uri": "models:/nope/3",
                        "name": "nope", "version": "3"}}
    store = _store(tmp_path / "tokens.zarr", registered["model_dir"], model_uri="models:/nope/3",
                   model_version="nope/3", model_source=src, weights_sha256=registered["sha"])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli_main(["decode", store, "--out", str(tmp_path / "out"), "--tracking-uri", registered["uri"]]) == 2
    err = _lines(capsys)
    assert len(err) == 1 and "Traceback" not in err[0], err
    line = err[0]
    assert f"cannot find the model of {store} (weights sha256 {registered['sha'][:12]}" in line
    for attempt in (f"{tmp_path / 'missing'} (no such folder)", f"{other} (its weights sha256",
                    f"models:/nope/3 in sqlite:///{tmp_path}/gone/mlflow.db (no such tracking store)",
                    f"models:/nope/3 in {registered['uri']} (not found)"):
        assert attempt in line, attempt
    assert line.index("missing") < line.index(str(other)) < line.index("gone") < line.index(registered["uri"])
    assert line.endswith("pass the store's model with --model, or the registry that holds it with --tracking-uri")
    assert not (tmp_path / "out").exists() and not (tmp_path / "gone").exists()


# -- older lineages --------------------------------------------------------------------------------
def test_old_lineage_without_a_source_resolves_as_before(registered, tmp_path, monkeypatch, capsys):
    project = registered["model_dir"].parent.parent.parent  # .../project, holding runs/tok/model
    # A relative path, from the folder it was made in.
    by_path = _store(tmp_path / "path.zarr", registered["model_dir"], model_uri="runs/tok/model")
    monkeypatch.chdir(project)
    assert cli_main(["decode", by_path, "--out", str(tmp_path / "a"), "--rows", "0:4"]) == 0
    assert "model: runs/tok/model (recorded reference, weights sha256 matches)" in _lines(capsys)
    # A registry reference (an alias, pinned by the recorded version), in the registry given by the flag.
    by_ref = _store(tmp_path / "ref.zarr", registered["model_dir"], model_uri=f"models:/{registered['name']}@x",
                    model_version=f"{registered['name']}/{registered['version']}")
    assert cli_main(["decode", by_ref, "--out", str(tmp_path / "b"), "--rows", "0:4",
                     "--tracking-uri", registered["uri"]]) == 0
    assert f"model: {registered['ref']} in {registered['uri']} (current registry, weights sha256 matches)" in _lines(capsys)
    # ... and the per-run database of an older run still opens, through MLFLOW_TRACKING_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    assert cli_main(["decode", by_ref, "--out", str(tmp_path / "c"), "--rows", "0:4"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["grid-00000.png"]


# -- the commands, from another folder -------------------------------------------------------------
def test_decode_sample_and_train_prior_find_the_tokenizer_from_another_folder(registered, tmp_path, monkeypatch,
                                                                               capsys):
    from tokenmill.models import save_model
    from tokenmill.models.prior import PriorConfig, TransformerPrior
    from tokenmill.pipeline.prior.config import load_prior_config
    from tokenmill.pipeline.prior.lineage import prior_lineage, read_prior_lineage, write_prior_lineage
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, tokenizer_lineage
    from tokenmill.pipeline.tokens.store import TokenStore
    from tokenmill.pipeline.training.tasks.prior import PriorTask

    # What `tokenize --model models:/NAME/1` records (made in the project's folder, with its registry).
    project = registered["model_dir"].parent.parent.parent
    monkeypatch.chdir(project)
    files = resolve_model(registered["ref"], registered["uri"])
    made = tokenizer_lineage(files, load_tokenizer(files, ExtractionOptions()), ExtractionOptions())
    assert made["model_source"] == source(files) and made["model_uri"] == registered["ref"]
    store = _store(project / "runs" / "tokens.zarr", registered["model_dir"], **{
        k: made[k] for k in ("model_uri", "model_version", "model_source", "weights_sha256")})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()

    assert cli_main(["decode", store, "--out", str(tmp_path / "decoded"), "--rows", "0:8"]) == 0
    assert f"model: {registered['model_dir'].resolve()} (recorded location, weights sha256 matches)" in _lines(capsys)

    # train-prior: the prior's lineage records the store (absolute) and every way to its tokenizer.
    config = load_prior_config(CONFIGS / "debug_prior.yaml", [f"data.store={os.path.relpath(store)}",
                                                              f"run.root={tmp_path / 'runs'}"])
    task = PriorTask(config)
    task.prepare(f"sqlite:///{tmp_path}/never-created.db")  # the current registry is not needed
    task.export_extras(tmp_path / "prior-model")
    lineage = read_prior_lineage(tmp_path / "prior-model")
    assert lineage["store_url"] == store and lineage["tokenizer_uri"] == registered["ref"]
    assert lineage["tokenizer_source"] == made["model_source"] and lineage["tokenizer_version"] == made["model_version"]
    assert not (tmp_path / "never-created.db").exists()

    # sample: the prior's lineage, the exported folder moved away: the MLflow artifact copy.
    prior = TransformerPrior(PriorConfig(codebook_size=PRIOR_K, num_classes=7, grid=[[2, 2]], dim=16, depth=1,
                                         heads=2))
    prior_dir = save_model(prior, tmp_path / "prior")
    store_lineage = TokenStore(store).token_attrs()["lineage"]
    write_prior_lineage(prior_dir, prior_lineage(store, store_lineage, prior.config.vocab(), [[2, 2]]))
    moved = registered["model_dir"].with_name("model-moved")
    registered["model_dir"].rename(moved)
    try:
        capsys.readouterr()
        assert cli_main(["sample", "--prior", str(prior_dir), "--n", "2", "--device", "cpu",
                         "--out", str(tmp_path / "samples"), "--json", str(tmp_path / "s.json")]) == 0
        line = next(x for x in _lines(capsys) if x.startswith("tokenizer: "))
        assert line == f"tokenizer: {made['model_source']['locations'][1]} (recorded location, weights sha256 matches)"
        assert json.loads((tmp_path / "s.json").read_text())["tokenizer"] == made["model_source"]["locations"][1]
    finally:
        moved.rename(registered["model_dir"])


# -- one tracking store per project folder ---------------------------------------------------------
def test_the_default_store_is_one_per_project_folder(tmp_path, monkeypatch):
    from tokenmill.pipeline.training.cluster_check import local_storage_problems
    from tokenmill.pipeline.training.config import load_train_config

    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    # The demo (runs/demo), the presets (runs) and retrain (runs/retrain) share runs/mlflow.db.
    for root in ("runs/demo", "runs", "runs/retrain", "./runs/debug-retrain"):
        assert tracking.default_tracking_uri(root) == db
    assert tracking.default_tracking_uri(tmp_path / "elsewhere") == f"sqlite:///{tmp_path.resolve()}/elsewhere/mlflow.db"
    assert tracking.resolve_tracking_uri(None, "runs/demo") == db and (tmp_path / "runs").is_dir()
    assert tracking.current_tracking_uri() is None  # read-only: no store here yet, none created
    (tmp_path / "runs" / "mlflow.db").touch()
    assert tracking.current_tracking_uri() == db
    # The config's URI and MLFLOW_TRACKING_URI still win (relative SQLite paths made absolute).
    assert tracking.resolve_tracking_uri("sqlite:///old/run/mlflow.db", "runs") == \
        f"sqlite:///{tmp_path.resolve()}/old/run/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri(None, "runs/demo") == tracking.current_tracking_uri() == "http://mlflow:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # The cluster check names that default.
    config = load_train_config(CONFIGS / "debug_vqvae.yaml", ["run.root=runs/x"])
    assert any(f"tracking.tracking_uri={db} (the default)" in p for p in local_storage_problems(config, {}))


def test_the_demo_and_retrain_track_in_the_project_store(tmp_path, monkeypatch):
    """Without running them: the URI each one resolves, from the same folder."""
    from tokenmill.pipeline.registry.config import load_retrain_config

    monkeypatch.chdir(tmp_path)
    retrain = load_retrain_config(CONFIGS / "retrain_vqvae.yaml")
    demo_root = Path("runs/demo")  # `tokenmill demo`'s default --root
    assert tracking.resolve_tracking_uri(retrain.tracking.tracking_uri, retrain.run.root) == \
        tracking.resolve_tracking_uri(None, demo_root) == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"


def test_a_resolved_recording_survives_redaction_and_the_store_identity(registered):
    """The source is a label of the store (a rerun may find the model elsewhere), not its identity."""
    from tokenmill.pipeline.runtime.redaction import redact
    from tokenmill.pipeline.tokens.store import _identity

    src = source(resolve_model(registered["ref"], registered["uri"]))
    assert redact({"model_source": src}) == {"model_source": src}
    run = {"lineage": {"model_uri": "a", "weights_sha256": "0" * 64, "model_source": src}, "layout": {}, "arrays": []}
    assert _identity(run) == _identity({**run, "lineage": {"model_uri": "b", "weights_sha256": "0" * 64}})


def test_a_recorded_server_that_does_not_answer_is_passed_over_at_once():
    from helpers.net import free_port

    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    record = Recorded("models:/tok/1", "0" * 64, {"locations": [], "registry": {
        "tracking_uri": server, "uri": "models:/tok/1", "name": "tok", "version": "1"}})
    started = time.monotonic()
    # ... tried once: the current registry is the recorded one here.
    with pytest.raises(UserError, match=rf"tried models:/tok/1 in {server} \(server not reachable\); f$"):
        resolve_recorded(record, owner="s", fix="f", tracking_uri=server)
    assert time.monotonic() - started < 20  # not MLflow's minutes of retries


def test_a_lineage_that_names_no_model_says_so():
    record = Recorded("", "0" * 64, {"locations": [], "registry": None})
    with pytest.raises(UserError, match=r"cannot find the tokenizer of p \(.*tried nothing .*; pass --tokenizer$"):
        resolve_recorded(record, owner="p", fix="pass --tokenizer", say=lambda _: None)
