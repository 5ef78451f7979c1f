"""The per-worker training loop that Ray Train runs on every rank.

Every rank: build the model, wrap it for DDP, inject the quantizers' collectives, restore the
latest checkpoint (if any), then loop: step; validate on the whole validation split (sums
all-reduced, so all ranks agree on early stopping); checkpoint and `ray.train.report` at the
same steps on every rank. Rank 0 alone prints progress and writes to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
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
from models.serialization import build_model, load_model, save_model
from models.training import TrainStep
from pipeline.ray_runtime import quiet_ray_data_logs
from pipeline.shards.stream import to_model_input
from pipeline.training import validation
from pipeline.training.config import TrainJobConfig
from pipeline.training.reporting import RankZeroLogger, say
from pipeline.training.state import TrainState, load_train_state, save_train_state

# Fault injection for the fault-tolerance test: the last rank raises once at this step, unless
# the attempt was restored from a checkpoint.
FAIL_AT_STEP_ENV = "TOKENMILL_FAIL_AT_STEP"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    config = TrainJobConfig.model_validate(loop_config["config"])
    quiet_ray_data_logs()  # rank 0 prints progress; a line per validation pass would bury it
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _seed_everything(config.train.seed + rank)
    if not config.scaling.use_gpu:
        # Ray sets OMP_NUM_THREADS only when the environment has none; match the worker's CPUs.
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))

    module = build_model(config.model)  # the unwrapped model: what EMA, validation and checkpoints see
    if config.train.init_from:  # before DDP and TrainStep, so replicas and EMA start from these weights
        load_initial_weights(module, config.train.init_from, loop_config["tracking_uri"])
    model = ray.train.torch.prepare_model(module)  # DDP when world_size > 1, moved to the device
    device = next(module.parameters()).device
    set_collectives(module, distributed_collectives())  # no-ops unless distributed
    steps = config.train.steps
    trainer = TrainStep(model, dataclasses.replace(config.optim, total_steps=config.optim.total_steps or steps))
    kl_weight = config.kl if getattr(module, "has_kl", False) else None

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_train_state(Path(directory), module, trainer, device)
    resumed_from = state.step

    logger = None
    if rank == 0:
        logger = RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"], config.tracking.log_images, steps)
        if resumed_from:
            say(f"resumed from step {resumed_from}")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    throughput = Throughput(config.train.batch_size * world_size)

    epoch_clock = loop_config.get("epoch_clock")
    while state.step < steps and not state.stopped_early:
        if epoch_clock is not None:  # this pass reads shard order, shuffle and augmentation of state.epoch
            ray.get(epoch_clock.set.remote(state.epoch))
        batches = train_shard.iter_torch_batches(
            batch_size=config.train.batch_size, drop_last=True, device=str(device),
            local_shuffle_buffer_size=config.data.shuffle_buffer or None,
            local_shuffle_seed=config.train.seed + 1000 * state.epoch + rank,
        )
        for batch_index, batch in enumerate(batches):
            if batch_index < state.batch_in_epoch:
                continue  # resuming mid-epoch: skip what the restored steps already consumed
            x, y = to_model_input(batch)  # x: (B, C, H, W) float in [0, 1]; y: (B,) int64
            extra = {"kl_weight": kl_weight(state.step)} if kl_weight else {}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.bf16):
                output, stats = trainer.step(x, y, **extra)
            state.step += 1
            state.batch_in_epoch = batch_index + 1
            throughput.step_done()
            _maybe_fail(state.step, rank == world_size - 1, resumed_from)

            if logger and state.step % config.train.log_every == 0:
                logger.log_step(state.step, output, stats, throughput.img_per_s(),
                                {**extra, "skipped_updates": trainer.skipped})

            is_last = state.step >= steps
            with throughput.paused():
                if state.step % config.train.val_every == 0 or is_last:
                    _validate(state, trainer.eval_model(), val_shard, config, device, rank, world_size, logger)
                if state.step % config.train.checkpoint_every == 0 or is_last or state.stopped_early:
                    _report_with_checkpoint(state, module, trainer, rank, resumed_from, throughput.img_per_s(), config)
            if is_last or state.stopped_early:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0

    if logger:
        logger.finish()


def _validate(state, model, val_shard, config, device, rank, world_size, logger) -> None:
    batches = val_shard.iter_torch_batches(batch_size=config.train.batch_size, device=str(device))
    metrics, counts = validation.evaluate(model, batches, config.train.iw_samples, rank, world_size)
    state.record_validation(metrics, config.train.early_stop)
    if logger:
        first = next(iter(val_shard.iter_torch_batches(batch_size=16, device=str(device))), None)
        logger.log_validation(state.step, metrics, counts, model, first)


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
    """All ranks report at the same steps; rank 0 attaches the checkpoint (DDP keeps weights equal)."""
    metrics = {"step": state.step, "epoch": state.epoch, "skipped_updates": trainer.skipped, "img_per_s": img_per_s,
               "resumed_from_step": resumed_from, "stopped_early": state.stopped_early, **state.last_val}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_train_state(Path(directory), state, module, trainer)
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

    with tempfile.TemporaryDirectory(prefix="tokenmill-init-") as directory:
        source = load_model(resolve_model(ref, tracking_uri).materialize(directory), name=ref)
    try:
        module.load_state_dict(source.state_dict())
    except RuntimeError as err:  # "Error(s) in loading state_dict for X:\n\tsize mismatch for ..."
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1][:300]
        raise UserError(f"train.init_from {ref} does not fit the `model` section of the config ({detail})") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _maybe_fail(step: int, is_last_rank: bool, resumed_from: int) -> None:
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
    if fail_at and is_last_rank and step == fail_at and resumed_from == 0:
        raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")
