"""Typed configs loaded from YAML with `--set a.b.c=value` overrides.

Every component's config is a pydantic model (or a stdlib dataclass carrying
`__pydantic_config__ = {"extra": "forbid"}`), so a typo or a wrong type is caught before any
work starts and reported as one `ConfigError` that names the key and the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from tokenmill.models.errors import UserError

T = TypeVar("T", bound=pydantic.BaseModel)

# The presets ship inside the package (`tokenmill/configs`, beside `pipeline/`), so a bare name
# like `debug_vqvae` works from any folder, in a clone and in an install alike.
PRESETS = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(UserError):
    """An invalid config file or override; the message names the key and the file."""


class StrictModel(pydantic.BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment,
    inf and NaN are refused (a number's range is declared with its field: pydantic.Field(gt=0),
    or models.ranges' annotations in the config dataclasses)."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"train.lr=3e-4"` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with every `a.b.c=value` override set (intermediate dicts created)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config argument: a YAML file, or the bare name of a preset (`vqvae_mnist`: `tokenmill/configs/vqvae_mnist.yaml`).
    A file of that name in the working folder wins; anything with a folder or a .yaml/.yml suffix is a file."""
    text = str(path)
    if Path(text).exists() or "/" in text or text.endswith((".yaml", ".yml")):
        return Path(text)
    preset = PRESETS / f"{text}.yaml"
    if not preset.is_file():
        raise ConfigError(f"config {text!r} is neither a file nor a preset (presets: {', '.join(preset_names())})")
    return preset


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:  # one line: the problem and where (yaml's own text spans several)
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', None) or err}{where})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def validate(schema: type[T], data: dict[str, Any], source: str) -> T:
    """Validate `data` against `schema`; errors become one ConfigError naming keys and `source`."""
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as err:
        problems = [_describe(error, data) for error in err.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML at `path` (or start from defaults), apply overrides, validate against `schema`."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return validate(schema, data, source)


def _describe(error: dict[str, Any], data: Any) -> str:
    key = _dotted_key(error["loc"], data)
    kind = error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{key}: unknown key (check the spelling; see the preset files in configs/)"
    if kind == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _dotted_key(loc: tuple[Any, ...], data: Any) -> str:
    """Dotted path of a pydantic error location, dropping tagged-union tags (e.g. 'vae')."""
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue  # pydantic inserts the discriminator value; the user never wrote it
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts) or "<top level>"


def to_plain(config: pydantic.BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a validated config (for logging and storing with models)."""
    return config.model_dump(mode="json")
