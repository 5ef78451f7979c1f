"""Training state that survives a restart: counters, early-stopping memory and checkpoint I/O.

A checkpoint directory holds `train_state.pt` (every part's weights, optimizer and EMA, counters,
the step's and the task's extra state, each rank's RNG), loaded with `torch.load(weights_only=True)`:
tensors and plain containers only, nothing unpickled.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from tokenmill.models.errors import UserError

STATE_FILE = "train_state.pt"
FORMAT = 2  # 2: one entry per part (format 1, one model + "trainer", is refused with a message)


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


def save_train_state(directory: Path, state: TrainState, parts: Mapping[str, Any], extra: dict[str, Any],
                     rng_states: list[dict[str, Any]]) -> None:
    """`parts`: name -> Part; `extra`: other state to restore (the step's GradScaler, the task's
    own, e.g. LeCAM averages); `rng_states`: every rank's `rank_rng_state`, indexed by rank."""
    payload = {
        "format": FORMAT,
        "state": dataclasses.asdict(state),
        "parts": {name: part.state_dict() for name, part in parts.items()},
        "extra": extra,
        "rng": list(rng_states),
    }
    torch.save(payload, directory / STATE_FILE)


def load_train_state(directory: Path, parts: Mapping[str, Any], device: torch.device,
                     rank: int = 0) -> tuple[TrainState, dict[str, Any]]:
    """Restore every part and this rank's own RNG state; returns the counters and the `extra`
    state. A rank that the saving run did not have (a bigger world now) keeps the RNG it was
    seeded with (seed + rank): ranks must not share random streams. A checkpoint of another
    format or of other parts is a UserError: resuming it would silently train something else."""
    payload = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    saved = payload.get("parts") if payload.get("format") == FORMAT else None
    if saved is None or set(saved) != set(parts):
        found = sorted(saved) if saved is not None else "an older tokenmill's"
        raise UserError(f"the checkpoint in {directory} holds {found} parts, this run trains {sorted(parts)}; "
                        "choose another run.name (or delete the run's checkpoints) to start fresh")
    for name, part in parts.items():
        part.load_state_dict(saved[name])
        part.module.to(device)
    rng = payload["rng"]
    if rank < len(rng):
        restore_rank_rng(rng[rank], device)
    return TrainState(**payload["state"]), payload["extra"]


def rank_rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG state: torch CPU, Python `random` and the CUDA generator of `device` only
    (never the other devices: another node may see fewer GPUs). Tensors, ints and None only, so
    `torch.load(weights_only=True)` reads it back."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None  # (n,) uint8
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def restore_rank_rng(rng: dict[str, Any], device: torch.device) -> None:
    """Set the RNG state saved by `rank_rng_state` (the CUDA part on `device` only)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    random.setstate(_as_tuple(rng["python"]))


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's `rank_rng_state`, indexed by rank (a collective: all ranks call it together),
    so rank 0 alone writes the checkpoint and still saves each rank's random streams."""
    import torch.distributed as dist

    mine = rank_rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a round trip through storage may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
