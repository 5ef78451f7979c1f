"""What every checkpoint converter shares: the result type, the source file's sha256, reading a
published PyTorch checkpoint without unpickling code, and loading a state dict onto a tokenmill
model through a key plan, with one-line errors that name the cause.
"""

from __future__ import annotations

import argparse
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokenmill.models.errors import UserError
from tokenmill.models.serialization import file_sha256  # noqa: F401 - the converters' checkpoint hash

# target key -> source keys; several sources are concatenated along dim 0 (a fused q/k/v conv)
KeyPlan = dict[str, tuple[str, ...]]
# Classes outside torch that load as themselves: plain attribute holders whose state a converter
# reads (LlamaGen's vq_train.py saves its argparse flags, the model's image size among them).
KNOWN_GLOBALS = {"argparse.Namespace": argparse.Namespace}


@dataclass(frozen=True)
class Converted:
    model: nn.Module  # a registered tokenmill model, eval mode
    source: dict[str, Any]  # kind, checkpoint path and sha256, config path(s) and sha256: the lineage's origin


class _Absent:
    """Stands in for a class a checkpoint names outside its weights (Lightning 1.x keys its callback
    states by the callback class): constructed and filled with state, never anything else."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def load_checkpoint(path: Path, ref: str) -> dict[str, Any]:
    """`torch.load(weights_only=True)` of a published checkpoint. Globals it names outside torch (the
    training framework's classes) load as inert `_Absent` objects, so no code from the file runs
    and pytorch_lightning need not be installed; `KNOWN_GLOBALS` load as themselves."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: stand in for the foreign ones
        pass
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as err:  # struct: truncated
        raise _unreadable(path, ref, err) from None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        foreign = [(KNOWN_GLOBALS.get(name, _Absent), name) for name in names if not name.startswith("torch.")]
        with torch.serialization.safe_globals(foreign):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, struct.error) as err:
        raise _unreadable(path, ref, err) from None


def _unreadable(path: Path, ref: str, err: Exception) -> UserError:
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return UserError(f"{ref}: {path} is not a readable PyTorch checkpoint ({detail}); download it again")


def load_mapped(model: nn.Module, state: dict[str, Tensor], plan: KeyPlan, ref: str, fix: str,
                ignored: tuple[str, ...] = ()) -> None:
    """Copy `state` (the source's keys) into `model` through `plan`; every planned source key must
    be there with the planned shape, and every other source key must start with one of `ignored`
    (a training loss's own networks). Model keys outside the plan keep their constructed values.
    Errors end with `fix` (what to do)."""
    needed = {key for sources in plan.values() for key in sources}
    missing = sorted(needed - state.keys())
    if missing:
        raise UserError(f"{ref}: the checkpoint lacks weights of the model its config describes ({_listed(missing)}); "
                        f"{fix}")
    unexpected = sorted(k for k in state.keys() - needed if not k.startswith(ignored))
    if unexpected:
        raise UserError(f"{ref}: the checkpoint has weights the model its config describes lacks "
                        f"({_listed(unexpected)}); {fix}")
    target = model.state_dict()
    values = {key: _planned_value(state, sources, target[key], ref, fix) for key, sources in plan.items()}
    model.load_state_dict({**target, **values})


def _listed(keys: list[str]) -> str:
    """'3: a, b, c' or '52: a, b, c, …'."""
    return f"{len(keys)}: {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''}"


def _planned_value(state: dict[str, Tensor], sources: tuple[str, ...], target: Tensor, ref: str, fix: str) -> Tensor:
    """The source tensor(s) for one model key, checked against its shape (each of n sources holds
    1/n of dim 0) and cast to its dtype."""
    expected = (target.shape[0] // len(sources), *target.shape[1:]) if target.dim() else ()
    for key in sources:
        found = state[key]
        if not isinstance(found, Tensor) or tuple(found.shape) != tuple(expected):
            shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            raise UserError(f"{ref}: {key} is {shape} in the checkpoint, but {tuple(expected)} in the model its "
                            f"config describes; {fix}")
    value = torch.cat([state[k] for k in sources]) if len(sources) > 1 else state[sources[0]]
    return value.to(target.dtype)
