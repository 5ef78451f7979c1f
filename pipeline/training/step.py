"""One optimizer step of a task: micro-batches, autocast, backward, updates.

For every micro-batch the task's `losses(batch, step, parts)` generator runs; the code it runs
up to each `yield Loss(...)` runs under autocast (the forward only), and the loss's backward
runs outside autocast before the generator resumes (a VQGAN yields the generator's loss, then
the discriminator's). With k micro-batches each backward is scaled by 1/k, so k accumulated
micro-batches give the gradient of one batch k times larger; DDP all-reduces gradients on the
last micro-batch only. Then every part that received a loss clips, skips or updates
(`Part.finish_step`). One GradScaler (fp16 only) serves every part, as PyTorch's AMP recipe for
several optimizers prescribes: scale each loss, unscale each optimizer, one `update()` a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from tokenmill.pipeline.training.optim import Part
from tokenmill.pipeline.training.precision import autocast


@dataclasses.dataclass
class Loss:
    """What a task's `losses` yields: a scalar that trains one part."""

    part: str  # the name of the Part whose parameters this loss trains
    value: torch.Tensor  # scalar to backward
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # scalars logged as train/<name>
    # The loss to log when `value` is a surrogate with the same gradient (the VQGAN step's)
    reported: torch.Tensor | None = None


LossFn = Callable[[Any, int, Mapping[str, Part]], Iterator[Loss]]


@dataclasses.dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # part -> its loss averaged over the micro-batches (detached, on device)
    metrics: dict[str, Any]  # the last micro-batch's Loss.metrics, all parts together
    parts: dict[str, dict[str, Any]]  # part -> Part.finish_step's {grad_norm, lr, skipped}


class StepRunner:
    def __init__(self, parts: Mapping[str, Part], precision: str, device: torch.device):
        self.parts, self.precision, self.device = parts, precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def run(self, losses: LossFn, micro_batches: Sequence[Any], step: int) -> StepResult:
        """One optimizer step of every part that `losses` trains, over `micro_batches`."""
        for part in self.parts.values():
            part.start_step()
        totals: dict[str, torch.Tensor] = {}
        metrics: dict[str, Any] = {}
        for i, batch in enumerate(micro_batches):
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                self._micro_step(losses(batch, step, self.parts), 1.0 / len(micro_batches), totals, metrics)
        stats = {name: self.parts[name].finish_step(self.scaler) for name in totals}
        if self.scaler is not None:
            self.scaler.update()  # an inf/NaN step lowers the scale, so fp16 recovers
        return StepResult(totals, metrics, stats)

    def _micro_step(self, losses: Iterator[Loss], scale: float, totals: dict, metrics: dict) -> None:
        while True:
            with autocast(self.precision, self.device):  # the task's forward code, up to its next yield
                loss = next(losses, None)
            if loss is None:
                return
            value = loss.value * scale
            # Always backward: skipping it on one DDP rank would hang the others.
            (self.scaler.scale(value) if self.scaler is not None else value).backward()
            reported = (loss.reported if loss.reported is not None else loss.value).detach().float() * scale
            totals[loss.part] = totals[loss.part] + reported if loss.part in totals else reported
            metrics.update(loss.metrics)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on the last micro-batch only (no_sync on the others)."""
        stack = contextlib.ExitStack()
        if not last:
            for part in self.parts.values():
                if hasattr(part.model, "no_sync"):
                    stack.enter_context(part.model.no_sync())
        return stack

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def own_loss(batch: Any, step: int, parts: Mapping[str, Part]) -> Iterator[Loss]:
    """The losses of a plain model trained on its own loss: `batch` is its forward's positional
    arguments, e.g. (x,) or (x, y). For training a model in a few lines (benchmarks, tests):
        runner = StepRunner({"model": Part("model", model, model, OptimConfig())}, "fp32", device)
        result = runner.run(own_loss, [(x, y)], step)"""
    output = parts["model"].model(*batch)
    yield Loss("model", output.loss, metrics=dict(output.metrics))
