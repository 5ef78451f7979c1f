"""Resolve `--model MODEL` to the bytes of a saved model directory (config.json + model.safetensors).

MODEL is one of:
  - a local model directory, or any fsspec URL of one (`s3://bucket/runs/x/model`);
  - an MLflow URI: `runs:/<run_id>/model`, `models:/<name>/<version>`, `models:/<name>@<alias>`
    (the training driver logs the directory as the run's `model` artifact and registers that);
  - a published checkpoint, `taming:PATH`, `llamagen:PATH` or `magvit2:CKPT,YAML` (`models.converters`), converted into a tokenmill model
    in memory; its config.json's `extra.converted_from` names the source and its sha256.

The result carries the files' bytes rather than a path: the driver ships them to encoding
actors through the Ray object store, so actors on other nodes never need the driver's disk.
It also says where the files can be found again from anywhere (`locations`: absolute folders,
URLs, MLflow artifact URIs; `registry`: the tracking store, name and version): what a store's
and a prior's lineage record (`pipeline.registry.resolver`).
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch

from tokenmill.models import converters
from tokenmill.models.errors import UserError
from tokenmill.models.serialization import CONFIG_FILE, WEIGHTS_FILE, load_model, model_file_bytes, read_model_config
from tokenmill.pipeline.registry import tracking

_MLFLOW_PREFIXES = ("runs:/", "models:/")
MODEL_DIR_TAG = "tokenmill.model_dir"  # a model version's tag: the absolute folder training exported it to


@dataclass(frozen=True)
class ModelFiles:
    uri: str  # what the user passed
    version: str | None  # "name/3" for registry URIs (aliases resolved), else None
    config: bytes  # config.json
    weights: bytes  # model.safetensors
    extras: dict[str, bytes] = field(default_factory=dict)  # optional side files asked for, when present
    # Where the same files are, from any folder: absolute paths / URLs of the model folder, the
    # MLflow artifact URI; a registry model's exported folder first when its version names one.
    locations: tuple[str, ...] = ()
    # {"tracking_uri", "uri" (pinned: models:/NAME/VERSION or runs:/ID/PATH), "name", "version"}
    registry: dict[str, str] | None = None

    @property
    def weights_sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    def load(self, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
        """The model with its weights, and its parsed config.json (class, config, extra). The one
        way pipeline code turns a resolved reference into a model."""
        with tempfile.TemporaryDirectory(prefix="tokenmill-model-") as directory:
            path = Path(directory)
            (path / CONFIG_FILE).write_bytes(self.config)
            (path / WEIGHTS_FILE).write_bytes(self.weights)
            # Errors name the reference the user gave, not this temporary folder.
            return load_model(path, map_location=map_location, name=self.uri), read_model_config(path, self.uri)


def resolve_model(ref: str, tracking_uri: str | None = None, storage_options: dict | None = None,
                  extra_files: tuple[str, ...] = ()) -> ModelFiles:
    """Read MODEL's files; UserError when the reference cannot be resolved or is no model.
    `extra_files`: optional side files of the model directory (e.g. a prior's lineage.json),
    returned in `extras` when present."""
    if ref.startswith(_MLFLOW_PREFIXES):
        return _read_mlflow(ref, tracking.current_tracking_uri(tracking_uri), extra_files)
    if converters.is_converted(ref):
        return _converted(ref)
    if "://" in ref and not ref.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(ref, **(storage_options or {}))
        try:
            config, weights = fs.cat_file(f"{path}/{CONFIG_FILE}"), fs.cat_file(f"{path}/{WEIGHTS_FILE}")
        except FileNotFoundError:
            raise UserError(f"{ref} is not a model directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}") from None
        extras = {name: fs.cat_file(f"{path}/{name}") for name in extra_files if fs.exists(f"{path}/{name}")}
        return ModelFiles(ref, None, config, weights, extras, locations=(ref.rstrip("/"),))
    path = Path(ref.removeprefix("file://"))
    if not path.is_dir():
        raise UserError(f"model {ref!r} is neither a directory nor an MLflow URI (runs:/…, models:/…)")
    folder = _model_dir(path, ref)
    return _read_dir(ref, None, folder, extra_files, locations=(str(folder.resolve()),))


def _converted(ref: str) -> ModelFiles:
    """A published checkpoint (`taming:…`) as the files `tokenmill convert` would write."""
    converted = converters.convert(ref)
    config, weights = model_file_bytes(converted.model, {"converted_from": converted.source})
    return ModelFiles(ref, None, config, weights)


def _read_mlflow(ref: str, tracking_uri: str | None, extra_files: tuple[str, ...] = ()) -> ModelFiles:
    """A `runs:/` or `models:/` model. A registry reference is pinned to its version first (an
    alias may move meanwhile) and downloaded from that version's source, so the files and the
    version recorded with them agree. The registry is the tracking store, named explicitly:
    MLflow resolves `models:/` through the process-wide registry URI, and setting that would
    change the default of every later job in this process."""
    import mlflow
    from mlflow.exceptions import MlflowException

    missing = tracking.missing_store(tracking_uri)
    if missing:  # MLflow would create an empty store there, then not find the model in it
        raise UserError(f"cannot download model {ref}: there is no MLflow store at {missing} (run from the project "
                        "folder that holds runs/mlflow.db, or pass --tracking-uri / set MLFLOW_TRACKING_URI)")
    try:
        client = tracking.client(tracking_uri)
        version = _registry_version(ref, client)
        locations, pinned = _artifact_locations(ref, version, client)
        source = locations[-1]
        with tempfile.TemporaryDirectory(prefix="tokenmill-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)
            where = tracking.absolute_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
            name, number = version.rsplit("/", 1) if version else (None, None)
            registry = {"tracking_uri": where, "uri": pinned, "name": name, "version": number}
            return _read_dir(ref, version, _model_dir(Path(local), ref), extra_files, locations=tuple(locations),
                             registry=registry)
    except (MlflowException, OSError) as err:
        where = tracking_uri or mlflow.get_tracking_uri()
        raise UserError(f"cannot download model {ref} from MLflow at {where}: {str(err).splitlines()[0]}") from None


def download_artifact(uri: str, tracking_uri: str | None, extra_files: tuple[str, ...] = ()) -> ModelFiles:
    """The model folder at an MLflow artifact URI (`mlflow-artifacts:/…`, `runs:/…`, or any scheme
    MLflow's artifact repositories read), through the store at `tracking_uri`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory(prefix="tokenmill-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri)
            return _read_dir(uri, None, _model_dir(Path(local), uri), extra_files, locations=(uri,))
    except (MlflowException, OSError) as err:
        raise UserError(f"cannot download {uri} from MLflow at {tracking_uri}: {str(err).splitlines()[0]}") from None


def _artifact_locations(ref: str, version: str | None, client) -> tuple[list[str], str]:
    """Where a `runs:/` or `models:/` model's files are: a registry version's exported folder (the
    version's `tokenmill.model_dir` tag, when training set one) and its artifact URI, the download
    source (last); and the reference pinned to its version."""
    if version:
        name, number = version.rsplit("/", 1)
        tags = client.get_model_version(name, number).tags or {}
        source = client.get_model_version_download_uri(name, number)
        exported = [tags[MODEL_DIR_TAG]] if tags.get(MODEL_DIR_TAG) else []
        return exported + [source], f"models:/{name}/{number}"
    run_id, _, path = ref.removeprefix("runs:/").partition("/")
    artifact = client.get_run(run_id).info.artifact_uri.rstrip("/")
    return ([f"{artifact}/{path}".rstrip("/")] if artifact else [ref]), ref


def _registry_version(ref: str, client) -> str | None:
    """`models:/name/3` -> "name/3"; `models:/name@alias` -> "name/<version the alias points to>";
    None for `runs:/` URIs."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", ref.rstrip("/"))
    if not match:
        return None
    name, number, alias = match.groups()
    if number:
        return f"{name}/{number}"
    return f"{name}/{client.get_model_version_by_alias(name, alias).version}"


def _model_dir(path: Path, ref: str) -> Path:
    """The directory holding config.json: `path` itself or its only sub-directory that does
    (downloads of `runs:/id/model` may land as `<dst>/model/`)."""
    if (path / CONFIG_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(CONFIG_FILE))
    if len(found) != 1:
        raise UserError(f"{ref} is not a model directory: expected one {CONFIG_FILE}, found {len(found)}")
    return found[0]


def _read_dir(ref: str, version: str | None, path: Path, extra_files: tuple[str, ...] = (),
              locations: tuple[str, ...] = (), registry: dict[str, str] | None = None) -> ModelFiles:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{ref}: {WEIGHTS_FILE} is missing; the model directory is incomplete")
    extras = {name: (path / name).read_bytes() for name in extra_files if (path / name).is_file()}
    return ModelFiles(ref, version, (path / CONFIG_FILE).read_bytes(), weights.read_bytes(), extras,
                      locations, registry)
