"""The per-worker loop of `tokenmill train-prior`, run by Ray Train on every rank.

Every rank: build the prior, wrap it for DDP, restore the latest checkpoint (if any), open the
store itself and read its own batches (`pipeline.prior.data`), then loop: step; validate (bits per
token, all-reduced); checkpoint and `ray.train.report` at the same steps on every rank. Rank 0
alone prints progress, writes to MLflow and draws sample grids. The optimiser, LR schedule, EMA,
checkpoint state and MLflow logger are `tokenmill train`'s own.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from models.serialization import build_model, save_model
from models.training import TrainStep
from pipeline.prior import data as prior_data
from pipeline.prior.config import PriorJobConfig
from pipeline.prior.validation import bits_per_token, sample_grid
from pipeline.runtime import faults
from pipeline.training.loop import Throughput, seed_everything
from pipeline.training.reporting import RankZeroLogger
from pipeline.training.state import TrainState, gather_rng_states, load_train_state, save_train_state


class PriorObjective(torch.nn.Module):
    """The prior as `TrainStep` drives a model: forward(tokens) -> .loss (nats per code token)
    and .metrics. DDP wraps this module, so its forward is the one that syncs gradients."""

    def __init__(self, prior: torch.nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, tokens: torch.Tensor, y: Any = None) -> types.SimpleNamespace:
        loss = self.prior.loss(tokens)  # tokens: (B, prefix + N); label dropout in train mode
        return types.SimpleNamespace(loss=loss, metrics={"bits_per_token": loss.detach() / math.log(2.0)})


@dataclasses.dataclass
class _PriorRun:
    """What one rank's loop works with, built once per attempt by `_start_rank`."""

    config: PriorJobConfig
    rank: int
    world_size: int
    objective: PriorObjective  # unwrapped: what checkpoints see
    trainer: TrainStep
    device: torch.device
    state: TrainState
    resumed_from: int
    batches: prior_data.TrainBatches
    val: Any  # the validation split's TokenDataset
    logger: RankZeroLogger | None  # rank 0 only
    tokenizer: torch.nn.Module | None  # rank 0 only: decodes sample grids
    throughput: Throughput


def prior_loop_per_worker(loop_config: dict[str, Any]) -> None:
    faults.install_from_env()  # tests: storage faults in this worker process too
    config = PriorJobConfig.model_validate(loop_config["config"])
    run = _start_rank(config, loop_config)
    while run.state.step < config.train.steps:
        if _train_one_epoch(run):
            break
    if run.logger:
        run.logger.finish()


def _start_rank(config: PriorJobConfig, loop_config: dict[str, Any]) -> _PriorRun:
    """Seed, build and wrap the prior, restore the latest checkpoint (if any), open the splits."""
    from models.prior import PriorConfig

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    seed_everything(config.train.seed + rank)
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    prior_config = PriorConfig(**loop_config["model_fields"])
    objective = PriorObjective(build_model(prior_config))
    model = ray.train.torch.prepare_model(objective)  # DDP when world_size > 1, moved to the device
    optim = dataclasses.replace(config.optim, total_steps=config.optim.total_steps or config.train.steps)
    trainer = TrainStep(model, optim)
    device = next(objective.parameters()).device
    state, checkpoint = TrainState(), ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_train_state(Path(directory), objective, trainer, device, rank)
    data = config.data
    train = prior_data.open_split(data, data.train_split, prior_config.num_classes)
    batches = prior_data.TrainBatches(train, data.train_split, rank, world_size, config.train.batch_size,
                                      config.train.seed, data.shuffle_window_chunks)
    logger = tokenizer = None
    if rank == 0:
        logger = RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"], config.tracking.log_images,
                                config.train.steps, loop_config.get("progress"))
        tokenizer = loop_config["tokenizer"].load()[0].eval() if config.train.sample_every else None
        if state.step:
            logger.say(state.step, f"resumed from step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return _PriorRun(config, rank, world_size, objective, trainer, device, state, state.step, batches,
                     prior_data.open_split(data, data.val_split, prior_config.num_classes), logger, tokenizer,
                     Throughput(config.train.batch_size * world_size))


def _train_one_epoch(run: _PriorRun) -> bool:
    """The rest of this epoch's batches (from `batch_in_epoch` when resuming); True once training is done."""
    state = run.state
    for batch_index, batch in run.batches.epoch(state.epoch, state.batch_in_epoch):
        _record_items(run, batch_index, batch["indices"])
        _train_step(run, batch["tokens"].to(run.device))
        state.batch_in_epoch = batch_index + 1
        if _validate_sample_checkpoint(run):
            return True
    state.epoch += 1
    state.batch_in_epoch = 0
    return False


def _train_step(run: _PriorRun, tokens: torch.Tensor) -> None:
    config, state = run.config, run.state
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=config.train.precision == "bf16"):
        output, stats = run.trainer.step(tokens)
    state.step += 1
    run.throughput.step_done()
    faults.hit("train.step", step=state.step, rank=run.rank)  # tests: a worker fails here
    if run.logger and state.step % config.train.log_every == 0:
        run.logger.log_step(state.step, output, stats, run.throughput.img_per_s(), {"skipped_updates": run.trainer.skipped})


def _validate_sample_checkpoint(run: _PriorRun) -> bool:
    """Validate, sample and checkpoint when due (every rank at the same steps); True when done."""
    config, state = run.config, run.state
    is_last = state.step >= config.train.steps
    with run.throughput.paused():
        if state.step % config.train.val_every == 0 or is_last:
            _validate(run)
        every = config.train.sample_every
        if run.logger and run.tokenizer is not None and every and (state.step % every == 0 or is_last):
            _log_samples(run)
        if state.step % config.train.checkpoint_every == 0 or is_last:
            _report_with_checkpoint(run)
    return is_last


def _validate(run: _PriorRun) -> None:
    config = run.config
    batches = prior_data.val_batches(run.val, run.rank, run.world_size, config.train.batch_size,
                                     config.data.val_max_items)
    bits = bits_per_token(run.trainer.eval_model().prior, batches, run.device)
    run.state.last_val = {"val/bits_per_token": bits}
    if run.logger:
        run.logger.log_validation(run.state.step, run.state.last_val, [], run.trainer.eval_model(), None)


def _log_samples(run: _PriorRun) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = sample_grid(run.trainer.eval_model().prior, run.tokenizer, run.config.sample, run.config.train.seed,
                           Path(directory) / f"step_{run.state.step:07d}.png")
        run.logger.mlflow.log_artifact(str(path), artifact_path="samples")


def _record_items(run: _PriorRun, batch_index: int, indices) -> None:
    """With `data.item_log` set, append what this rank reads ("epoch batch item...") to
    `<item_log>/rank<r>.txt`: an audit of which samples a run saw (tests check the partition)."""
    folder = run.config.data.item_log
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{run.rank}.txt", "a") as log:
            log.write(f"{run.state.epoch} {batch_index} {' '.join(map(str, indices.tolist()))}\n")


def _report_with_checkpoint(run: _PriorRun) -> None:
    """All ranks report at the same steps; rank 0 attaches the checkpoint (train state with every
    rank's RNG, and the exportable prior: config.json + model.safetensors)."""
    state = run.state
    metrics = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
               "seq_per_s": run.throughput.img_per_s(), "skipped_updates": run.trainer.skipped,
               "resumed_from_step": run.resumed_from, **state.last_val}
    rng_states = gather_rng_states(run.device)  # a collective: every rank calls it
    if run.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_train_state(Path(directory), state, run.objective, run.trainer, rng_states)
        save_model(run.trainer.eval_model().prior, Path(directory) / "model")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
