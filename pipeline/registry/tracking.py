"""MLflow helpers: where to track, one run per training run name, and model registration.

Embedded default: one SQLite file per project folder, beside the runs (`runs/mlflow.db` for
`run.root: runs/<anything>`; MLflow >= 3.13 refuses a plain `./mlruns` file store), so the demo,
`train`, `train-prior` and `retrain` started from one folder share one store and one registry.
`MLFLOW_TRACKING_URI` (or the config) points the same code at a server. Stores of older runs
(`<run dir>/mlflow.db`) still open with `--tracking-uri` / `tracking.tracking_uri`.
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


TRACKING_DB = "mlflow.db"
DEFAULT_RUNS_ROOT = "runs"  # `run.root`'s default: the project's store is <project>/runs/mlflow.db


def project_store_folder(run_root: str | Path = DEFAULT_RUNS_ROOT) -> Path:
    """The folder of the project's default tracking store, absolute: for a relative `run.root`
    inside the working directory, its top folder there (`runs/demo`, `runs/retrain` and `runs`
    all give `<cwd>/runs`); for any other root, the root itself."""
    root = Path(run_root)
    if root.is_absolute():
        return root.resolve()
    resolved, cwd = root.resolve(), Path.cwd().resolve()
    if resolved == cwd or not resolved.is_relative_to(cwd):
        return resolved
    return cwd / resolved.relative_to(cwd).parts[0]


def default_tracking_uri(run_root: str | Path = DEFAULT_RUNS_ROOT) -> str:
    """`sqlite:///<project store folder>/mlflow.db` (see `project_store_folder`)."""
    return f"sqlite:///{project_store_folder(run_root) / TRACKING_DB}"


def resolve_tracking_uri(configured: str | None, run_root: str | Path = DEFAULT_RUNS_ROOT) -> str:
    """Config value, else `MLFLOW_TRACKING_URI`, else the project's store beside the runs
    (`default_tracking_uri(run_root)`, its folder created). Relative SQLite paths made absolute."""
    if configured:
        return absolute_tracking_uri(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    project_store_folder(run_root).mkdir(parents=True, exist_ok=True)
    return default_tracking_uri(run_root)


def current_tracking_uri(explicit: str | None = None) -> str | None:
    """The registry a command reads when it is given no other: `explicit` (a flag), else
    `MLFLOW_TRACKING_URI`, else this folder's project store (`runs/mlflow.db`) when it exists,
    else None (MLflow's own default). Never creates a store."""
    if explicit:
        return absolute_tracking_uri(explicit)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return absolute_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    if (project_store_folder() / TRACKING_DB).is_file():
        return default_tracking_uri()
    return None


def absolute_tracking_uri(uri: str) -> str:
    """`uri` with a relative SQLite path or bare folder made absolute (`sqlite:///runs/mlflow.db`
    -> `sqlite:////home/me/project/runs/mlflow.db`), so a recorded URI means the same store from
    any working directory; any other URI (a server, `databricks`, an absolute path) unchanged."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return f"sqlite:///{Path(path).resolve()}"
        return uri
    if ":" not in uri and not uri.startswith("databricks"):
        return str(Path(uri).resolve())  # a bare folder: MLflow's file store
    return uri


def missing_store(tracking_uri: str | None) -> str | None:
    """The store's URI when it is a SQLite file that does not exist (None: MLflow's default store);
    reading it would create an empty one. None when it exists or is no SQLite file."""
    if tracking_uri is None:
        import mlflow

        tracking_uri = mlflow.get_tracking_uri()
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path.startswith(":memory:") or Path(path).is_file():
        return None
    return tracking_uri


def sqlite_folder(tracking_uri: str) -> Path | None:
    """The folder of a SQLite store's file (`sqlite:///…/mlflow.db`), None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve().parent


def client(tracking_uri: str | None):
    """A client for `tracking_uri` (None: MLflow's default) whose model registry is the same
    store. Nothing global is set: `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI,
    which would become the default of every later job in this process."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def get_or_create_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
                      run_dir: str | Path | None = None) -> str:
    """The id of the MLflow run for `run_name` (reused when a training run resumes).

    With a local SQLite store, artifacts go to `mlartifacts/` beside the database file (MLflow's
    default would be `./mlruns` in whatever directory the job was started from; `run_dir`, when
    the store has no file, e.g. in memory); a server decides for itself."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found:
        experiment_id = found.experiment_id
    else:
        folder = sqlite_folder(tracking_uri) or (Path(run_dir).resolve() if run_dir is not None else None)
        local = tracking_uri.startswith("sqlite:") and folder is not None
        location = (folder / "mlartifacts").as_uri() if local else None
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


def require_reachable(tracking_uri: str, timeout: float = 10) -> None:
    """Fail before any work when a tracking server is configured but cannot be reached."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout)
    except OSError as err:
        raise UserError(
            f"MLflow tracking server {tracking_uri} is not reachable ({err}); start it or unset "
            "MLFLOW_TRACKING_URI to use the local SQLite store"
        ) from None
