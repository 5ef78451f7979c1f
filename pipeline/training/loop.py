"""The per-worker training loop that Ray Train runs on every rank.

Every rank: build the model, wrap it for DDP, inject the quantizers' collectives, restore the
latest checkpoint (if any), then loop: step; validate on the whole validation split (sums
all-reduced, so all ranks agree on early stopping); checkpoint and `ray.train.report` at the
same steps on every rank. Rank 0 alone prints progress and writes to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from models.quantizers.collectives import distributed_collectives, set_collectives
from models.serialization import build_model, save_model
from models.training import TrainStep
from pipeline.runtime import faults
from pipeline.runtime.ray_connection import quiet_ray_data_logs
from pipeline.shards.stream import to_model_input
from pipeline.training import validation
from pipeline.training.adversarial import build_train_step
from pipeline.training.config import TrainJobConfig
from pipeline.training.reporting import RankZeroLogger
from pipeline.training.state import TrainState, gather_rng_states, load_train_state, save_train_state


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    faults.install_from_env()  # tests: storage faults in this worker process too
    config = TrainJobConfig.model_validate(loop_config["config"])
    quiet_ray_data_logs()  # rank 0 prints progress; a line per validation pass would bury it
    run = _start_rank(config, loop_config)
    epoch_clock = loop_config.get("epoch_clock")
    while run.state.step < config.train.steps and not run.state.stopped_early:
        if epoch_clock is not None:  # this pass reads shard order, shuffle and augmentation of state.epoch
            ray.get(epoch_clock.set.remote(run.state.epoch))
        _train_one_pass(run)
    if run.logger:
        run.logger.finish()


@dataclasses.dataclass
class _RankRun:
    """What one rank's loop works with, built once per attempt by `_start_rank`."""

    config: TrainJobConfig
    rank: int
    world_size: int
    module: torch.nn.Module  # unwrapped: what EMA, validation and checkpoints see
    trainer: TrainStep
    device: torch.device
    kl_weight: Any  # the KL schedule (step -> weight) for models with a KL term, else None
    state: TrainState
    resumed_from: int
    logger: RankZeroLogger | None  # rank 0 only
    train_shard: Any
    val_shard: Any
    throughput: Throughput


def _start_rank(config: TrainJobConfig, loop_config: dict[str, Any]) -> _RankRun:
    """Seed, build and wrap the model, restore the latest checkpoint (if any), open the data shards."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    seed_everything(config.train.seed + rank)
    if not config.scaling.use_gpu:
        # Ray sets OMP_NUM_THREADS only when the environment has none; match the worker's CPUs.
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    module, trainer = _build_model_and_trainer(config, loop_config["tracking_uri"])
    device = next(module.parameters()).device
    kl_weight = config.kl if getattr(module, "has_kl", False) else None

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_train_state(Path(directory), module, trainer, device, rank)

    logger = None
    if rank == 0:
        logger = RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"], config.tracking.log_images,
                                config.train.steps, loop_config.get("progress"))
        if state.step:
            logger.say(state.step, f"resumed from step {state.step}")
    return _RankRun(config, rank, world_size, module, trainer, device, kl_weight, state, state.step, logger,
                    ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"),
                    Throughput(config.train.batch_size * world_size))


def _build_model_and_trainer(config: TrainJobConfig, tracking_uri: str) -> tuple[torch.nn.Module, TrainStep]:
    """The unwrapped model (on its device, collectives injected) and the TrainStep over its DDP wrapper."""
    module = build_model(config.model)  # the unwrapped model: what EMA, validation and checkpoints see
    if config.train.init_from:  # before DDP and TrainStep, so replicas and EMA start from these weights
        load_initial_weights(module, config.train.init_from, tracking_uri)
    model = ray.train.torch.prepare_model(module)  # DDP when world_size > 1, moved to the device
    set_collectives(module, distributed_collectives())  # no-ops unless distributed
    optim = dataclasses.replace(config.optim, total_steps=config.optim.total_steps or config.train.steps)
    # With a `loss` section: the two-optimizer VQGAN step; its discriminator goes into DDP the same way.
    trainer = build_train_step(model, optim, config.loss, wrap=ray.train.torch.prepare_model,
                               precision=config.train.resolved_precision())
    return module, trainer


def _train_one_pass(run: _RankRun) -> None:
    """One pass over this rank's train shard (the rest of it when resuming mid-epoch), until the
    last step or an early stop; a full pass advances the epoch."""
    config, state = run.config, run.state
    batches = run.train_shard.iter_torch_batches(
        batch_size=config.train.batch_size, drop_last=True, device=str(run.device),
        local_shuffle_buffer_size=config.data.shuffle_buffer or None,
        local_shuffle_seed=config.train.seed + 1000 * state.epoch + run.rank,
    )
    for batch_index, batch in enumerate(batches):
        if batch_index < state.batch_in_epoch:
            continue  # resuming mid-epoch: skip what the restored steps already consumed
        _train_step(run, batch)
        state.batch_in_epoch = batch_index + 1
        if _validate_and_checkpoint(run):
            return
    state.epoch += 1
    state.batch_in_epoch = 0


def _train_step(run: _RankRun, batch: Any) -> None:
    """One optimizer step on `batch`; rank 0 logs the step's metrics every `log_every` steps."""
    config, state = run.config, run.state
    x, y = to_model_input(batch)  # x: (B, C, H, W) float in [0, 1]; y: (B,) int64
    extra = {"kl_weight": run.kl_weight(state.step)} if run.kl_weight else {}
    output, stats = run.trainer.step(x, y, **extra)  # autocast (train.precision) covers its forward only
    state.step += 1
    run.throughput.step_done()
    faults.hit("train.step", step=state.step, rank=run.rank)  # tests: a worker fails here
    if run.logger and state.step % config.train.log_every == 0:
        run.logger.log_step(state.step, output, stats, run.throughput.img_per_s(),
                            {**extra, "skipped_updates": run.trainer.skipped})


def _validate_and_checkpoint(run: _RankRun) -> bool:
    """Validate and checkpoint when due (every rank at the same steps); True once training is done."""
    config, state = run.config, run.state
    is_last = state.step >= config.train.steps
    with run.throughput.paused():
        if state.step % config.train.val_every == 0 or is_last:
            _validate(state, run.trainer.eval_model(), run.val_shard, config, run.device, run.rank, run.world_size,
                      run.logger)
        if state.step % config.train.checkpoint_every == 0 or is_last or state.stopped_early:
            _report_with_checkpoint(state, run.module, run.trainer, run.rank, run.resumed_from,
                                    run.throughput.img_per_s(), config)
    return is_last or state.stopped_early


def _validate(state, model, val_shard, config, device, rank, world_size, logger) -> None:
    batches = val_shard.iter_torch_batches(batch_size=config.train.batch_size, device=str(device))
    # Rank 0's images come from its first val batch: a second pass over a split stream by rank 0
    # alone would wait for the other ranks.
    first: list[Any] = []
    metrics, counts = validation.evaluate(model, _keep_first(batches, first), config.train.iw_samples, rank,
                                          world_size)
    state.record_validation(metrics, config.train.early_stop)
    if logger:
        logger.log_validation(state.step, metrics, counts, model, first[0] if first else None)


def _keep_first(batches, into: list):
    for batch in batches:
        if not into:
            into.append(batch)
        yield batch


class Throughput:
    """Training images per second (all ranks): validation and checkpoint time are excluded, and
    so is the first step of an attempt (start-up and warm-up)."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.seconds, self.steps = 0.0, 0
        self._mark: float | None = None

    def step_done(self) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self.seconds += now - self._mark
            self.steps += 1
        self._mark = now

    @contextlib.contextmanager
    def paused(self):
        yield
        if self._mark is not None:
            self._mark = time.perf_counter()

    def img_per_s(self) -> float:
        return self.steps * self.images_per_step / self.seconds if self.seconds else 0.0


def _report_with_checkpoint(state: TrainState, module, trainer: TrainStep, rank: int, resumed_from: int,
                            img_per_s: float, config: TrainJobConfig) -> None:
    """All ranks report at the same steps; rank 0 attaches the checkpoint (DDP keeps weights equal,
    and every rank's RNG state reaches it through a gather)."""
    metrics = {"step": state.step, "epoch": state.epoch, "skipped_updates": trainer.skipped, "img_per_s": img_per_s,
               "resumed_from_step": resumed_from, "stopped_early": state.stopped_early, **state.last_val}
    rng_states = gather_rng_states(next(module.parameters()).device)  # every rank's, for rank 0 to save
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_train_state(Path(directory), state, module, trainer, rng_states)
        # The exportable model (EMA weights when EMA is on): config.json + model.safetensors.
        # The transform travels with the model so tokenization decodes images the way training did.
        save_model(trainer.eval_model(), Path(directory) / "model",
                   extra={"transform": config.data.transform.for_eval().model_dump(mode="json")})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def load_initial_weights(module: torch.nn.Module, ref: str, tracking_uri: str) -> None:
    """Copy the weights of model `ref` into `module` (strict: the architectures must match).
    Every rank resolves `ref` itself, so it works on nodes that never saw the driver's disk; the
    driver calls it once on a fresh model before Ray starts, so a bad `ref` is a UserError at once."""
    from models.errors import UserError
    from pipeline.registry.model_ref import resolve_model

    source, _ = resolve_model(ref, tracking_uri).load()
    try:
        module.load_state_dict(source.state_dict())
    except RuntimeError as err:  # "Error(s) in loading state_dict for X:\n\tsize mismatch for ..."
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1][:300]
        raise UserError(f"train.init_from {ref} does not fit the `model` section of the config ({detail})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

