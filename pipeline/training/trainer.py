"""Driver side of training: validate the config and the data before Ray starts, create (or
find, when resuming) the MLflow run, start Ray Train's TorchTrainer over the streamed shards,
then export the final model (config.json + safetensors) and register it in MLflow.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.runtime import faults

# Environment the driver forwards to training workers: fault injection (tests) and S3 endpoint.
# Never credentials: a runtime env is visible to every dashboard / state-API user of a shared
# cluster. Local Ray workers inherit the driver's environment anyway (the driver starts local Ray);
# on KubeRay every pod gets its own AWS_* from the `tokenmill-s3` secret (infra/kuberay/raycluster.yaml).
FORWARDED_ENV = (faults.ENV, faults.STORAGE_ENV, "AWS_ENDPOINT_URL_S3")


@dataclasses.dataclass
class TrainSummary:
    """What a training run produced; `to_json()` is what `tokenmill train --json` writes."""

    run_name: str
    final_metrics: dict[str, Any]  # rank 0's last report: step, epoch, img_per_s, val/* ...
    checkpoint: str  # the latest Ray Train checkpoint directory
    model_dir: str  # the exported model: config.json + model.safetensors
    mlflow_tracking_uri: str
    mlflow_run_id: str
    registered_model: str
    model_version: str
    model_uri: str  # models:/<registered_model>/<model_version>
    skipped_samples: dict[str, Any]  # per split: the stream's skip-and-count report

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(config) -> TrainSummary:
    import ray.data

    from models.serialization import model_class_for_kind
    from pipeline.config import to_plain
    from pipeline.registry import tracking
    from pipeline.runtime.ray_connection import ensure_ray
    from pipeline.runtime.redaction import redact
    from pipeline.training.adversarial import require_loss_weights
    from pipeline.training.cluster_check import check_cluster_storage, check_local_gpus
    from pipeline.training.data import TRAIN_COLUMNS, resolve_training_data
    from pipeline.training.progress import TrainProgress

    check_cluster_storage(config)  # node-local paths on a multi-node cluster: refused before any work
    check_local_gpus(config.scaling)  # GPUs asked of a local Ray that has none: refused, not waited for
    run_dir = config.run.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    loss_tags = require_loss_weights(config.loss, model_class_for_kind(config.model.kind))  # before any work
    data = resolve_training_data(config)  # missing / empty shards fail here, before Ray work
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, run_dir)
    tracking.require_reachable(tracking_uri)
    if config.train.init_from:  # a warm start that cannot load fails here, not later on every rank
        from models.serialization import build_model
        from pipeline.training.loop import load_initial_weights

        load_initial_weights(build_model(config.model), config.train.init_from, tracking_uri)
    run_id = tracking.get_or_create_run(
        tracking_uri, config.tracking.experiment, config.run.name,
        tags={"tokenmill.data_manifest_identity": data.manifest_identity, "tokenmill.git_commit": tracking.git_commit(),
              "tokenmill.model_kind": config.model.kind, **loss_tags},
        run_dir=run_dir,
    )
    tracking.log_params_once(tracking_uri, run_id, tracking.flatten(redact(to_plain(config))))

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints its own progress line
    streams = data.open_streams()
    datasets = {name: stream.dataset.select_columns(TRAIN_COLUMNS) for name, stream in streams.items()}
    with TrainProgress(config.train.steps) as progress:
        trainer = build_trainer(config, datasets, tracking_uri, run_id, streams["train"].epoch_clock, progress.board)
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")

    model_dir = export_model(result.checkpoint, run_dir / "model")
    registered_name = config.tracking.registered_model or config.run.name
    version = tracking.register_model_dir(
        tracking_uri, run_id, model_dir, registered_name,
        tags={"tokenmill.data_manifest_identity": data.manifest_identity, "tokenmill.step": str(result.metrics["step"])},
    )
    return TrainSummary(
        run_name=config.run.name, final_metrics=result.metrics, checkpoint=result.checkpoint.path,
        model_dir=str(model_dir.resolve()), mlflow_tracking_uri=tracking_uri, mlflow_run_id=run_id,
        registered_model=registered_name, model_version=version, model_uri=f"models:/{registered_name}/{version}",
        skipped_samples={name: stream.report() for name, stream in streams.items()},
    )


def export_model(checkpoint, model_dir: Path) -> Path:
    """Copy the checkpoint's exportable model (config.json + safetensors) to `model_dir`."""
    with checkpoint.as_directory() as directory:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(Path(directory) / "model", model_dir)
    return model_dir


def worker_env_vars() -> dict[str, str]:
    """The driver's environment that training workers get through the Ray runtime env (no secrets)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def build_trainer(config, datasets: dict[str, Any], tracking_uri: str, run_id: str, epoch_clock=None,
                  progress=None):
    """The TorchTrainer that runs `train_loop_per_worker` for `config` over `datasets`
    ({"train", "val"} Ray Datasets with `image` and `label` columns); `epoch_clock` is the train
    stream's EpochClock, which the workers set before every pass; `progress` is the driver's
    ProgressBoard (None: rank 0 prints its progress lines instead)."""
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.config import to_plain
    from pipeline.training.data import ingest_config
    from pipeline.training.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_plain(config), "tracking_uri": tracking_uri, "run_id": run_id,
                           "epoch_clock": epoch_clock, "progress": progress},
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),  # NCCL between GPUs
        scaling_config=scaling_config(config.scaling),
        run_config=run_config(config.run),
        datasets=datasets,
        dataset_config=ingest_config(datasets),  # train split equally, val whole; stream order kept
    )


def scaling_config(scaling):
    """Ray Train's ScalingConfig for a job's `scaling` section (workers, GPU, CPUs per worker)."""
    import ray.train

    return ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                   resources_per_worker={"CPU": scaling.cpus_per_worker})


def run_config(run):
    """Ray Train's RunConfig for a job's `run` section: a fixed name and storage path (a rerun
    resumes from the latest checkpoint), retries, checkpoints kept, the forwarded environment."""
    import ray.train

    return ray.train.RunConfig(
        name=run.name, storage_path=run.resolved_storage_path(),
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
        worker_runtime_env={"env_vars": worker_env_vars()},
    )
