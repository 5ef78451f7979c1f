"""Save and load models as a directory: `config.json` + `model.safetensors`. Nothing is unpickled.

Every model class is registered under its class name with `@register_model`; it must
expose `self.config` (a dataclass) and accept that dataclass as its only constructor argument.
`load_model(path)` reads `config.json`, rebuilds the dataclass, constructs the class and loads
the weights strictly, so a checkpoint from another architecture fails with a clear message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from tokenmill.models.errors import UserError


def file_sha256(path: Path | str) -> str:
    """The sha256 of a (possibly large) file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

_MODELS: dict[str, type[torch.nn.Module]] = {}


def register_model(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
    """Class decorator: make `cls` loadable by `load_model` and buildable by `build_model`."""
    config_cls = getattr(cls, "config_class", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{cls.__name__} needs a dataclass `config_class` to be registered")
    _MODELS[cls.__name__] = cls
    return cls


def registered_models() -> dict[str, type[torch.nn.Module]]:
    return dict(_MODELS)


def model_class_for_kind(kind: str) -> type[torch.nn.Module]:
    """The model class whose config dataclass has `kind == kind` (e.g. "vae", "vqvae")."""
    for cls in _MODELS.values():
        if getattr(cls.config_class, "kind", None) == kind:
            return cls
    known = sorted(str(getattr(c.config_class, "kind", "?")) for c in _MODELS.values())
    raise UserError(f"unknown model kind {kind!r}; known kinds: {', '.join(known)}")


def build_model(config: Any) -> torch.nn.Module:
    """Build a fresh model from its config dataclass (or a dict with a `kind` key)."""
    if isinstance(config, dict):
        cls = model_class_for_kind(config.get("kind", ""))
        config = _config_from_dict(cls, config)
    else:
        cls = model_class_for_kind(config.kind)
    return cls(config)


def _config_from_dict(cls: type[torch.nn.Module], values: dict[str, Any]) -> Any:
    config_cls = cls.config_class
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(
            f"{cls.__name__} config has unknown keys {unknown}; it was probably written by a "
            "different tokenmill version — retrain or upgrade tokenmill"
        )
    return config_cls(**values)


def model_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    return dataclasses.asdict(model.config)


def model_file_bytes(model: torch.nn.Module, extra: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
    """The bytes of `config.json` and `model.safetensors` for `model` (deterministic for equal weights)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "class": type(model).__name__,
        "config": model_config_dict(model),
        "extra": extra or {},
    }
    # safetensors refuses shared storage; contiguous clones keep tied weights safe to save.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return json.dumps(meta, indent=2, sort_keys=True).encode(), safetensors_bytes(state)


def save_model(model: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `path/config.json` and `path/model.safetensors`; returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, weights = model_file_bytes(model, extra)
    (path / CONFIG_FILE).write_bytes(config)
    (path / WEIGHTS_FILE).write_bytes(weights)
    return path


def read_model_config(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """The parsed `config.json` of a saved model directory (class, config, extra). Errors call
    the model `name` (what the user passed, when `path` is a temporary copy), else `path`."""
    name = name or str(path)
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{name} is not a tokenmill model directory: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{name}: {CONFIG_FILE} is not valid JSON ({err}); re-save the model") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(
            f"{name}: {CONFIG_FILE} has format_version {found!r}, this tokenmill "
            f"reads {FORMAT_VERSION}; upgrade tokenmill or re-save the model"
        )
    return meta


def load_model(path: str | Path, map_location: str | torch.device = "cpu", name: str | None = None) -> torch.nn.Module:
    """Rebuild the saved model class from `config.json` and load its safetensors weights.
    Anything unreadable is a UserError calling the model `name` (default: `path`)."""
    path = Path(path)
    name = name or str(path)
    meta = read_model_config(path, name)
    cls = _MODELS.get(meta.get("class", ""))
    if cls is None:
        raise UserError(
            f"{name}: unknown model class {meta.get('class')!r}; known: {', '.join(sorted(_MODELS))}"
        )
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{name}: {CONFIG_FILE} has no `config` section; re-save the model")
    model = cls(_config_from_dict(cls, meta["config"]))
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{name}: {WEIGHTS_FILE} is missing; the model directory is incomplete")
    try:
        state = load_file(str(weights_path), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)  # shape mismatch: RuntimeError
    except (SafetensorError, RuntimeError) as err:
        raise UserError(f"{name}: {WEIGHTS_FILE} is unreadable or does not fit {cls.__name__} "
                        f"({str(err).strip().splitlines()[-1].strip()}); re-save the model") from None
    if missing or unexpected:
        raise UserError(
            f"{name}: {WEIGHTS_FILE} does not match {cls.__name__}({meta['config']}): "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "the weights come from a different architecture"
        )
    return model.to(map_location)
