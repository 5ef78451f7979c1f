"""Driver side of `tokenmill train-prior`: check the store, its tokenizer and the model config
before Ray starts, create (or find, when resuming) the MLflow run, run Ray Train over
`pipeline.prior.loop`, then export the prior with its lineage and register it in MLflow.

Everything that can be wrong with the input (no store, an unfinished or latent store, a missing
split, a tokenizer that cannot be read or whose weights differ from the store's lineage, a model
section that disagrees with the store) stops the job here with one UserError (exit 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.prior.config import PriorJobConfig


@dataclasses.dataclass
class PriorTrainSummary:
    """What a prior training run produced; `to_json()` is what `tokenmill train-prior --json` writes."""

    run_name: str
    final_metrics: dict[str, Any]  # rank 0's last report: step, epoch, seq_per_s, val/bits_per_token
    store: str
    tokenizer_uri: str
    checkpoint: str
    model_dir: str  # config.json + model.safetensors + lineage.json
    mlflow_tracking_uri: str
    mlflow_run_id: str
    registered_model: str
    model_version: str
    model_uri: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Checked:
    """What the driver established before Ray starts."""

    model_fields: dict[str, Any]  # PriorConfig keyword arguments, vocabulary filled from the store
    tokenizer: Any  # ModelFiles of the store's tokenizer, weights checked against its lineage


def check_inputs(config: PriorJobConfig, tracking_uri: str | None) -> _Checked:
    """Open both splits, match the model section to the store, and resolve the tokenizer."""
    from models.errors import UserError
    from models.prior import PriorConfig
    from pipeline.prior import data

    probe = data.open_split(config.data, config.data.train_split, 0)
    fields = data.resolve_model_fields(config.model, data.store_vocab(probe))
    for split in (config.data.train_split, config.data.val_split):
        data.open_split(config.data, split, fields["num_classes"])  # UserError: no such split
    try:
        prior = PriorConfig(**fields)  # the model's own checks (e.g. dim divisible by heads), before Ray
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    return _Checked(fields, store_tokenizer(config, prior, tracking_uri))


def store_tokenizer(config: PriorJobConfig, prior, tracking_uri: str | None):
    """The `ModelFiles` of the tokenizer the store's lineage names, with the recorded weights
    sha256 and a code shape that fits `prior` (PriorConfig); UserError otherwise."""
    from models.errors import UserError
    from pipeline.prior.sampling import check_tokenizer_fits
    from pipeline.tokens.detokenize import resolve_recorded_model
    from pipeline.tokens.store import TokenStore

    data = config.data
    lineage = TokenStore(data.store, data.storage_options).token_attrs()["lineage"]
    hint = "train-prior needs the store's own tokenizer (it decodes the sample grids and goes into the lineage)"
    try:
        files = resolve_recorded_model(lineage["model_uri"], lineage["weights_sha256"], data.store, hint,
                                       tracking_uri, data.storage_options)
        check_tokenizer_fits(files.load()[0], prior, files.uri)
    except UserError as err:  # not found, other weights (that message ends with the hint), other code shapes
        detail = str(err) if str(err).endswith(hint) else f"{err}; {hint}"
        raise UserError(f"the tokenizer of {data.store} is unusable: {detail}") from None
    return files


def train_prior(config: PriorJobConfig) -> PriorTrainSummary:
    from pipeline.config import to_plain
    from pipeline.registry import tracking
    from pipeline.runtime.ray_connection import ensure_ray
    from pipeline.runtime.redaction import redact
    from pipeline.training.cluster_check import check_local_gpus
    from pipeline.training.progress import TrainProgress
    from pipeline.training.trainer import export_model

    run_dir = config.run.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, run_dir)
    checked = check_inputs(config, tracking_uri)  # every input problem stops the job here
    check_local_gpus(config.scaling)
    tracking.require_reachable(tracking_uri)
    tags = {"tokenmill.token_store": redact(config.data.store), "tokenmill.model_kind": "prior",
            "tokenmill.tokenizer_sha256": checked.tokenizer.weights_sha256, "tokenmill.git_commit": tracking.git_commit()}
    run_id = tracking.get_or_create_run(tracking_uri, config.tracking.experiment, config.run.name, tags=tags,
                                        run_dir=run_dir)
    tracking.log_params_once(tracking_uri, run_id, tracking.flatten(redact(to_plain(config))))

    ensure_ray()
    with TrainProgress(config.train.steps, desc="train-prior") as progress:
        result = build_prior_trainer(config, checked, tracking_uri, run_id, progress.board).fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = export_model(result.checkpoint, run_dir / "model")
    _write_lineage(model_dir, config, checked)
    registered = config.tracking.registered_model or config.run.name
    version = tracking.register_model_dir(tracking_uri, run_id, model_dir, registered,
                                          tags={"tokenmill.step": str(result.metrics["step"])})
    return PriorTrainSummary(
        run_name=config.run.name, final_metrics=result.metrics, store=config.data.store,
        tokenizer_uri=checked.tokenizer.uri, checkpoint=result.checkpoint.path, model_dir=str(model_dir.resolve()),
        mlflow_tracking_uri=tracking_uri, mlflow_run_id=run_id, registered_model=registered,
        model_version=version, model_uri=f"models:/{registered}/{version}",
    )


def build_prior_trainer(config: PriorJobConfig, checked: _Checked, tracking_uri: str, run_id: str, progress=None):
    """The TorchTrainer running `prior_loop_per_worker`; no Ray Datasets: every rank reads the store."""
    from ray.train.torch import TorchTrainer

    from pipeline.config import to_plain
    from pipeline.prior.loop import prior_loop_per_worker
    from pipeline.training.trainer import run_config, scaling_config

    loop_config = {"config": to_plain(config), "model_fields": checked.model_fields, "tokenizer": checked.tokenizer,
                   "tracking_uri": tracking_uri, "run_id": run_id, "progress": progress}
    return TorchTrainer(prior_loop_per_worker, train_loop_config=loop_config,
                        scaling_config=scaling_config(config.scaling), run_config=run_config(config.run))


def _write_lineage(model_dir, config: PriorJobConfig, checked: _Checked) -> None:
    """lineage.json next to the prior's config.json: the store, its tokenizer and the vocabulary."""
    from models.prior import PriorConfig
    from pipeline.prior.lineage import prior_lineage, write_prior_lineage
    from pipeline.runtime.redaction import redact

    prior = PriorConfig(**checked.model_fields)
    tokenizer = {"model_uri": checked.tokenizer.uri, "weights_sha256": checked.tokenizer.weights_sha256}
    write_prior_lineage(model_dir, prior_lineage(redact(config.data.store), tokenizer, prior.vocab(), prior.grid))
