"""Training state that survives a restart: counters, early-stopping memory and checkpoint I/O.

A checkpoint directory holds `train_state.pt` (model, TrainStep state, counters, RNG), loaded
with `torch.load(weights_only=True)` — tensors and plain containers only, nothing unpickled.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed (resume skips them)
    best: float | None = None
    validations_without_improvement: int = 0
    stopped_early: bool = False
    last_val: dict[str, float] = field(default_factory=dict)

    def record_validation(self, metrics: dict[str, float], early_stop: Any) -> None:
        """Remember the metrics and decide early stopping (identical on every rank: the metrics
        are all-reduced before they get here)."""
        self.last_val = dict(metrics)
        if early_stop.metric is None:
            return
        if early_stop.metric not in metrics:
            raise KeyError(f"early_stop.metric {early_stop.metric!r} is not one of {sorted(metrics)}")
        value = metrics[early_stop.metric]
        better = self.best is None or (value < self.best if early_stop.mode == "min" else value > self.best)
        if better:
            self.best, self.validations_without_improvement = value, 0
        else:
            self.validations_without_improvement += 1
            self.stopped_early = self.validations_without_improvement >= early_stop.patience


def save_train_state(directory: Path, state: TrainState, module: torch.nn.Module, trainer: Any) -> None:
    payload = {
        "state": dataclasses.asdict(state),
        "model": module.state_dict(),
        "trainer": trainer.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
    }
    torch.save(payload, directory / STATE_FILE)


def load_train_state(directory: Path, module: torch.nn.Module, trainer: Any, device: torch.device) -> TrainState:
    payload = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    module.load_state_dict(payload["model"])
    module.to(device)
    trainer.load_state_dict(payload["trainer"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    random.setstate(_as_tuple(payload["rng"]["python"]))
    return TrainState(**payload["state"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through storage may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
