"""The per-rank training loop: one loop for every task (`pipeline.training.task`).

Every rank: seed, open the task's data, build its parts, warm-start (`train.init_from`), place
and wrap them (`RankContext.prepare`: DDP), inject the quantizers' collectives, optionally
compile, restore the latest checkpoint; then, epoch after epoch, gather `train.accumulate`
micro-batches into one step (`pipeline.training.step`) and do whatever is due after it, at the
same steps on every rank:
    validate (every rank, sums all-reduced; early stopping) -> rank 0: the task's images
    -> checkpoint and report (every rank reports; rank 0 attaches the checkpoint).
Rank 0 alone prints progress and writes to MLflow. The same loop runs inside Ray Train
(`ray_train_loop`) and in this process (`run_rank` with a `LocalContext`), which is how the unit
tests run every task without Ray.
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
import torch

from tokenmill.models.errors import UserError
from tokenmill.models.quantizers.collectives import distributed_collectives, set_collectives
from tokenmill.pipeline.runtime import faults
from tokenmill.pipeline.training.context import RankContext, RayTrainContext
from tokenmill.pipeline.training.optim import Part
from tokenmill.pipeline.training.precision import configure_device_math, resolve_precision
from tokenmill.pipeline.training.reporting import RankZeroLogger
from tokenmill.pipeline.training.state import TrainState, gather_rng_states, load_train_state, save_train_state
from tokenmill.pipeline.training.step import StepResult, StepRunner
from tokenmill.pipeline.training.task import Task


@dataclasses.dataclass
class LoopSpec:
    """What a rank needs besides its task."""

    tracking_uri: str | None = None  # None: no MLflow (in-process runs that track nothing)
    run_id: str | None = None
    progress: Any = None  # the driver's ProgressBoard actor; None: progress lines on stdout
    epoch_clocks: dict[str, Any] = dataclasses.field(default_factory=dict)  # dataset name -> EpochClock


def ray_train_loop(loop_config: dict[str, Any]) -> None:
    """What Ray Train's TorchTrainer runs on every worker: {"task": Task, "spec": LoopSpec}."""
    from tokenmill.pipeline.runtime.ray_connection import quiet_ray_data_logs

    faults.install_from_env()  # tests: storage faults in this worker process too
    quiet_ray_data_logs()  # rank 0 prints progress; a line per validation pass would bury it
    task, spec = loop_config["task"], loop_config["spec"]
    run_rank(task, RayTrainContext(spec.epoch_clocks, task.config.scaling), spec)


def run_rank(task: Task, context: RankContext, spec: LoopSpec) -> TrainState:
    """Train `task` on this rank until `train.steps` or an early stop; returns the final counters."""
    run = RankRun.start(task, context, spec)
    try:
        while not run.finished:
            run.train_epoch()
    except BaseException:
        run.close("FAILED")  # in process, the next run must not find this one still active
        raise
    run.close()
    return run.state


class RankRun:
    """One rank's training: built by `start`, advanced by `train_epoch`."""

    def __init__(self, task: Task, context: RankContext, parts: dict[str, Part], runner: StepRunner,
                 state: TrainState, logger: RankZeroLogger | None):
        self.task, self.context, self.parts, self.runner, self.state, self.logger = (
            task, context, parts, runner, state, logger)
        self.loop = task.config.train
        self.main = next(iter(parts.values()))  # the model: validated, checkpointed, exported
        self.resumed_from = state.step
        self.throughput = Throughput(context.world_size * self.loop.batch_size * self.loop.accumulate)

    @classmethod
    def start(cls, task: Task, context: RankContext, spec: LoopSpec) -> RankRun:
        loop = task.config.train
        seed_everything(loop.seed + context.rank)
        configure_device_math(context.device)
        task.setup(context)
        parts = build_parts(task, context, spec.tracking_uri)
        runner = StepRunner(parts, resolve_precision(loop.precision, context.device), context.device)
        state = restore(task, context, parts, runner)
        logger = None
        if context.rank == 0:
            logger = RankZeroLogger(spec.tracking_uri, spec.run_id, loop.steps, spec.progress)
            if state.step:
                logger.say(state.step, f"resumed from step {state.step} (epoch {state.epoch}, "
                                       f"batch {state.batch_in_epoch})")
        return cls(task, context, parts, runner, state, logger)

    @property
    def finished(self) -> bool:
        return self.state.step >= self.loop.steps or self.state.stopped_early

    def train_epoch(self) -> None:
        """The rest of this epoch (from `batch_in_epoch` when resuming), until done; a whole pass
        advances the epoch. Micro-batches short of a full step at the epoch's end are dropped."""
        state, micro, steps = self.state, [], 0
        for index, batch in self.task.batches(state.epoch, state.batch_in_epoch):
            micro.append(batch)
            if len(micro) < self.loop.accumulate:
                continue
            self.step(micro)
            micro, steps = [], steps + 1
            state.batch_in_epoch = index + 1
            if self.after_step():
                return
        if not steps and not state.batch_in_epoch:
            raise UserError(f"an epoch of the training split gives this rank fewer than train.accumulate="
                            f"{self.loop.accumulate} batches of {self.loop.batch_size}; lower train.batch_size")
        state.epoch += 1
        state.batch_in_epoch = 0

    def step(self, micro_batches: list[Any]) -> None:
        result = self.runner.run(self.task.losses, micro_batches, self.state.step)
        self.state.step += 1
        self.throughput.step_done()
        faults.hit("train.step", step=self.state.step, rank=self.context.rank)  # tests: a worker fails here
        if self.logger and self.state.step % self.loop.log_every == 0:
            metrics = self.step_metrics(result)
            postfix = f"loss {metrics['loss']:.4f}  {self.throughput.rate():.0f} {self.task.example}/s"
            self.logger.log_step(self.state.step, metrics, postfix)

    def step_metrics(self, result: StepResult) -> dict[str, float]:
        """Floats to log (one host read for every tensor, the step's only one, on logging steps
        alone): the model's loss, grad norm and lr, the other parts' with their name as prefix,
        the task's metrics and the rates."""
        values: dict[str, Any] = dict(result.metrics)
        for name, stats in result.parts.items():
            prefix = "" if self.parts[name] is self.main else f"{name}_"
            values |= {f"{prefix}loss": result.losses[name], f"{prefix}grad_norm": stats["grad_norm"],
                       f"{prefix}lr": stats["lr"], f"{prefix}skipped_updates": self.parts[name].skipped_tensor}
        scalars = {k: v for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1}
        tensors = [k for k, v in scalars.items() if torch.is_tensor(v)]
        if tensors:
            read = torch.stack([scalars[k].detach().float().reshape(()) for k in tensors]).tolist()
            scalars |= dict(zip(tensors, read))
        return {k: float(v) for k, v in scalars.items()} | self.task.rate_metrics(self.throughput.rate())

    def after_step(self) -> bool:
        """Validate, log images and checkpoint when due (every rank at the same steps); True when done."""
        loop, step = self.loop, self.state.step
        last = step >= loop.steps
        validated = step % loop.val_every == 0 or last
        with self.throughput.paused():
            if validated:
                self.validate()
            if self.logger and samples_due(loop.sample_every, step, last, validated):
                self.task.log_extras(self.main.eval_module(), step, self.logger)
            if step % loop.checkpoint_every == 0 or last or self.state.stopped_early:
                self.checkpoint()
        return last or self.state.stopped_early

    def validate(self) -> None:
        metrics = self.task.validate(self.main.eval_module())
        self.state.record_validation(metrics, self.loop.early_stop)
        if self.logger:
            self.logger.log_validation(self.state.step, metrics)

    def checkpoint(self) -> None:
        """Every rank reports; rank 0 attaches the checkpoint: the train state (every part, the
        step's scaler, the task's state, every rank's RNG) and the exportable model."""
        state = self.state
        metrics = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                   "skipped_updates": self.main.skipped, "resumed_from_step": self.resumed_from,
                   "stopped_early": state.stopped_early, **self.task.rate_metrics(self.throughput.rate()),
                   **state.last_val}
        rng_states = gather_rng_states(self.context.device)  # a collective: every rank calls it
        if self.context.rank != 0:
            self.context.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as directory:
            extra = {"step": self.runner.state_dict(), "task": self.task.state_dict()}
            save_train_state(Path(directory), state, self.parts, extra, rng_states)
            self.task.save(self.main.eval_module(), Path(directory) / "model")
            self.context.report(metrics, Path(directory))

    def close(self, status: str = "FINISHED") -> None:
        if self.logger:
            self.logger.finish(status)


def samples_due(every: int | None, step: int, last: bool, validated: bool) -> bool:
    """`train.sample_every`: None = with every validation, 0 = never, N = every N steps and at the end."""
    if every is None:
        return validated
    return every > 0 and (step % every == 0 or last)


def build_parts(task: Task, context: RankContext, tracking_uri: str | None) -> dict[str, Part]:
    """The task's modules as Parts: warm-started (the first, with train.init_from) before DDP and
    EMA copy them, on the device, DDP-wrapped, collectives injected, optionally compiled."""
    loop = task.config.train
    parts: dict[str, Part] = {}
    for name, (module, optim) in task.build().items():
        if not parts and loop.init_from:
            load_initial_weights(module, loop.init_from, tracking_uri)
        model = context.prepare(module)  # moves `module` to the device too
        set_collectives(module, distributed_collectives())  # no-ops unless distributed
        if loop.compile:
            model = torch.compile(model, backend=loop.compile)
        optim = dataclasses.replace(optim, total_steps=optim.total_steps or loop.steps)
        parts[name] = Part(name, module, model, optim)
    return parts


def restore(task: Task, context: RankContext, parts: dict[str, Part], runner: StepRunner) -> TrainState:
    """The latest checkpoint's state (parts, scaler, task, this rank's RNG), or a fresh start."""
    with context.latest_checkpoint() as folder:
        if folder is None:
            return TrainState()
        state, extra = load_train_state(folder, parts, context.device, context.rank)
    runner.load_state_dict(extra.get("step", {}))
    task.load_state_dict(extra.get("task", {}))
    return state


def load_initial_weights(module: torch.nn.Module, ref: str, tracking_uri: str | None) -> None:
    """Copy the weights of model `ref` into `module` (strict: the architectures must match).
    Every rank resolves `ref` itself, so it works on nodes that never saw the driver's disk; the
    driver calls it once on a fresh model before Ray starts, so a bad `ref` is a UserError at once."""
    from tokenmill.pipeline.registry.model_ref import resolve_model

    source, _ = resolve_model(ref, tracking_uri).load()
    try:
        module.load_state_dict(source.state_dict())
    except RuntimeError as err:  # "Error(s) in loading state_dict for X:\n\tsize mismatch for ..."
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][-1][:300]
        raise UserError(f"train.init_from {ref} does not fit the `model` section of the config ({detail})") from None


class Throughput:
    """Training examples per second over all ranks (images, sequences: the task's `example`).
    Validation, images and checkpoints are excluded, and so is the first step of an attempt
    (start-up and warm-up)."""

    def __init__(self, examples_per_step: int):
        self.examples_per_step = examples_per_step
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

    def rate(self) -> float:
        return self.steps * self.examples_per_step / self.seconds if self.seconds else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
