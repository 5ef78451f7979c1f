"""MLflow helpers: where to track, one run per training run name, and model registration.

Embedded default: a SQLite file under the run directory (MLflow >= 3.13 refuses a plain
`./mlruns` file store). `MLFLOW_TRACKING_URI` (or the config) points the same code at a server.
Only one process writes at a time: the driver before and after training, rank 0 during it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tokenmill.models.errors import UserError

RUN_NAME_TAG = "tokenmill.run_name"
MODEL_ARTIFACT = "model"


def resolve_tracking_uri(configured: str | None, run_dir: str | Path) -> str:
    """Config value, else `MLFLOW_TRACKING_URI`, else `sqlite:///<run_dir>/mlflow.db`."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run_dir / 'mlflow.db'}"


def client(tracking_uri: str | None):
    """A client for `tracking_uri` (None: MLflow's default) whose model registry is the same
    store. Nothing global is set: `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI,
    which would become the default of every later job in this process."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_or_create_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
                      run_dir: str | Path | None = None) -> str:
    """The id of the MLflow run for `run_name` (reused when a training run resumes).

    With a local SQLite store, artifacts go to `<run_dir>/mlartifacts` (MLflow's default would be
    `./mlruns` in whatever directory the job was started from); a server decides for itself."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        local = tracking_uri.startswith("sqlite:") and run_dir is not None
        location = (Path(run_dir).resolve() / "mlartifacts").as_uri() if local else None
        experiment_id = mlflow_client.create_experiment(experiment, artifact_location=location)
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if runs:
        return runs[0].info.run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    return run.info.run_id


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def log_params_once(tracking_uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log params unless the run already has them (a resumed run must not re-log: MLflow refuses
    changing a param's value, and identical values are a no-op)."""
    from mlflow.entities import Param

    mlflow_client = client(tracking_uri)
    existing = mlflow_client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):  # MLflow caps params per batch at 100
        mlflow_client.log_batch(run_id, params=new[start : start + 100])


def git_commit() -> str:
    """The source tree's commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register_model_dir(
    tracking_uri: str, run_id: str, model_dir: str | Path, registered_name: str, tags: dict[str, str]
) -> str:
    """Log `model_dir` (config.json + model.safetensors) as the run's `model` artifact and register
    it as a new version of `registered_name`; returns the version number."""
    mlflow_client = client(tracking_uri)
    mlflow_client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_ARTIFACT)
    try:
        mlflow_client.get_registered_model(registered_name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException by backend
        mlflow_client.create_registered_model(registered_name)
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = mlflow_client.create_model_version(registered_name, source, run_id=run_id, tags=tags)
    return str(version.version)


def require_reachable(tracking_uri: str) -> None:
    """Fail before any work when a tracking server is configured but cannot be reached."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10)
    except OSError as err:
        raise UserError(
            f"MLflow tracking server {tracking_uri} is not reachable ({err}); start it or unset "
            "MLFLOW_TRACKING_URI to use the local SQLite store"
        ) from None
