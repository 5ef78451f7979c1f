"""The training engine's driver: one sequence for every task (`pipeline.training.task`).

    checks (node-local storage on a multi-node cluster, GPUs a local Ray lacks, the task's own
    inputs, a warm start that cannot load) -> the MLflow run (found again when resuming) ->
    Ray Train's TorchTrainer over `loop.ray_train_loop` (fixed run name: a rerun resumes from the
    latest checkpoint; FailureConfig restarts failed workers) -> export (config.json +
    safetensors + the task's extras) -> register in MLflow -> the summary.
Every input problem stops the job before Ray starts, with one UserError (exit 2).

`train(config)` is `tokenmill train`, `train_prior(config)` is `tokenmill train-prior`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from tokenmill.pipeline.runtime import faults
from tokenmill.pipeline.training.loop import LoopSpec
from tokenmill.pipeline.training.task import Inputs, Task

# Environment the driver forwards to training workers: fault injection (tests) and S3 endpoint.
# Never credentials: a runtime env is visible to every dashboard / state-API user of a shared
# cluster. Local Ray workers inherit the driver's environment anyway (the driver starts local Ray);
# on KubeRay every pod gets its own AWS_* from the `tokenmill-s3` secret (infra/kuberay/raycluster.yaml).
FORWARDED_ENV = (faults.ENV, faults.STORAGE_ENV, "AWS_ENDPOINT_URL_S3")


@dataclasses.dataclass
class TrainSummary:
    """What a training run produced; `to_json()` is what `tokenmill train[-prior] --json` writes."""

    task: str  # tokenizer, adversarial, prior
    run_name: str
    final_metrics: dict[str, Any]  # rank 0's last report: step, epoch, <example>_per_s, val/* ...
    checkpoint: str  # the latest checkpoint's folder (Ray Train's, or in-process: under run.storage_path)
    model_dir: str  # the exported model: config.json + model.safetensors (+ lineage.json for a prior)
    mlflow_tracking_uri: str
    mlflow_run_id: str
    registered_model: str
    model_version: str
    model_uri: str  # models:/<registered_model>/<model_version>
    details: dict[str, Any]  # the task's own: skipped_samples (images), store and tokenizer_uri (prior)

    def to_json(self) -> dict[str, Any]:
        plain = dataclasses.asdict(self)
        details = plain.pop("details")
        return {**plain, **details}


def train(config) -> TrainSummary:
    """`tokenmill train`: a tokenizer; with a `loss` section, the adversarial (VQGAN) task."""
    from tokenmill.pipeline.training.tasks.adversarial import AdversarialTask
    from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

    return fit(AdversarialTask(config) if config.loss is not None else TokenizerTask(config))


def train_prior(config) -> TrainSummary:
    """`tokenmill train-prior`: a Transformer prior over a token store."""
    from tokenmill.pipeline.training.tasks.prior import PriorTask

    return fit(PriorTask(config))


def fit(task: Task) -> TrainSummary:
    """Check, track, train (on Ray, or in this process with `scaling.in_process`), export and
    register `task`'s model."""
    from tokenmill.pipeline.registry import tracking

    config = task.config
    tracking_uri, run_id = _checked_run(task)
    train = _train_in_process if config.scaling.in_process else _train_on_ray
    model_dir = config.run.run_dir() / "model"
    checkpoint, metrics, inputs = train(task, LoopSpec(tracking_uri, run_id), model_dir)
    task.export_extras(model_dir)
    registered = config.tracking.registered_model or config.run.name
    from tokenmill.pipeline.registry.model_ref import MODEL_DIR_TAG

    version = tracking.register_model_dir(tracking_uri, run_id, model_dir, registered,
                                          tags={"tokenmill.step": str(metrics["step"]), **task.version_tags(),
                                                MODEL_DIR_TAG: str(model_dir.resolve())})
    return TrainSummary(
        task=task.name, run_name=config.run.name, final_metrics=metrics, checkpoint=checkpoint,
        model_dir=str(model_dir.resolve()), mlflow_tracking_uri=tracking_uri, mlflow_run_id=run_id,
        registered_model=registered, model_version=version, model_uri=f"models:/{registered}/{version}",
        details=task.summary(inputs),
    )


def _train_on_ray(task: Task, spec: LoopSpec, model_dir: Path) -> tuple[str, dict[str, Any], Inputs]:
    """Ray Train's TorchTrainer over the engine's loop; exports the latest checkpoint's model to
    `model_dir`. Returns (that checkpoint's path on `run.storage_path`, its metrics, the inputs)."""
    import ray.data

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.training.progress import TrainProgress

    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 prints its own progress line
    inputs = task.inputs(in_process=False)
    with TrainProgress(task.config.train.steps, desc=task.command) as progress:
        spec = dataclasses.replace(spec, progress=progress.board, epoch_clocks=inputs.epoch_clocks)
        result = build_torch_trainer(task, spec, inputs).fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:  # downloaded when on object storage
        export_model(Path(directory), model_dir)
    return result.checkpoint.path, result.metrics, inputs


def _train_in_process(task: Task, spec: LoopSpec, model_dir: Path) -> tuple[str, dict[str, Any], Inputs]:
    """The engine's loop on one rank in this process, no Ray (`scaling.in_process`): checkpoints
    in `<run.storage_path>/<run.name>/`, so a rerun resumes as on Ray; the latest one's model is
    exported to `model_dir`."""
    import torch

    from tokenmill.pipeline.training.context import LocalContext
    from tokenmill.pipeline.training.loop import run_rank
    from tokenmill.pipeline.training.progress import TrainProgress

    config = task.config
    inputs = task.inputs(in_process=True)
    device = "cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    context = LocalContext(Path(config.run.resolved_storage_path()) / config.run.name, inputs.datasets,
                           device=device, keep=config.run.keep_checkpoints)
    with TrainProgress(config.train.steps, desc=task.command, in_process=True) as progress:
        run_rank(task, context, dataclasses.replace(spec, progress=progress.board))
    checkpoint = context.checkpoints()[-1]
    export_model(checkpoint, model_dir)
    return str(checkpoint), context.metrics(checkpoint), inputs


def _checked_run(task: Task) -> tuple[str, str]:
    """Every check before Ray starts, then the MLflow run: (tracking URI, run id)."""
    from tokenmill.pipeline.config import to_plain
    from tokenmill.pipeline.registry import tracking
    from tokenmill.pipeline.runtime.redaction import redact
    from tokenmill.pipeline.training.cluster_check import check_cluster_storage, check_local_gpus

    config = task.config
    check_cluster_storage(config, task.shared_data())  # node-local paths on a multi-node cluster
    check_local_gpus(config.scaling)  # GPUs asked of a local Ray that has none: refused, not waited for
    run_dir = config.run.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, config.run.root)
    tags = task.prepare(tracking_uri)  # the task's inputs: every problem stops the job here
    if config.train.init_from:  # a warm start that cannot load fails here, not later on every rank
        from tokenmill.pipeline.training.loop import load_initial_weights

        module, _ = next(iter(task.build().values()))
        load_initial_weights(module, config.train.init_from, tracking_uri)
    tracking.require_reachable(tracking_uri)
    task.announce()  # every input accepted
    kind = getattr(getattr(config, "model", None), "kind", task.name)
    tags |= {"tokenmill.task": task.name, "tokenmill.model_kind": kind, "tokenmill.git_commit": tracking.git_commit()}
    run_id = tracking.get_or_create_run(tracking_uri, config.tracking.experiment, config.run.name, tags=tags,
                                        run_dir=run_dir)
    tracking.log_params_once(tracking_uri, run_id, tracking.flatten(redact(to_plain(config))))
    return tracking_uri, run_id


def build_torch_trainer(task: Task, spec: LoopSpec, inputs: Inputs):
    """The TorchTrainer that runs the engine's loop for `task` on every worker."""
    from ray.train.torch import TorchConfig, TorchTrainer

    from tokenmill.pipeline.training.loop import ray_train_loop

    config = task.config
    return TorchTrainer(
        ray_train_loop,
        train_loop_config={"task": task, "spec": spec},
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),  # NCCL between GPUs
        scaling_config=scaling_config(config.scaling),
        run_config=run_config(config.run),
        datasets=inputs.datasets or None,
        **({"dataset_config": inputs.data_config} if inputs.data_config is not None else {}),
    )


def export_model(checkpoint: Path, model_dir: Path) -> Path:
    """Copy the checkpoint folder's exportable model (config.json + safetensors) to `model_dir`."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(checkpoint / "model", model_dir)
    return model_dir


def worker_env_vars() -> dict[str, str]:
    """The driver's environment that training workers get through the Ray runtime env (no secrets)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


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
