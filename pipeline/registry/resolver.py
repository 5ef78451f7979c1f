"""Find the model a lineage names, from any working directory and any project; and resolve what a
user passes (`--model`, `--tokenizer`, `--prior`) under the same defaults. decode, sample,
train-prior, eval, export and tokenize all go through here.

A token store's lineage (`model_*` keys) and a prior's `lineage.json` (`tokenizer_*` keys) record
every way to the model; `source(files)` builds the record when the lineage is written:

    model_uri / tokenizer_uri          the reference the user gave (a label, as before)
    weights_sha256 / tokenizer_sha256  the weights' hash: every copy found is checked against it
    model_source / tokenizer_source    {"locations": [absolute folder, URL or MLflow artifact URI, ...],
                                        "registry": {"tracking_uri", "uri", "name", "version"} or null}

`resolve_recorded` tries, in this order: each recorded location (a copy whose weights hash
matches), the recorded registry, then the current one (`--tracking-uri`, `MLFLOW_TRACKING_URI`,
this folder's `runs/mlflow.db`, MLflow's default). The command names the one it used in one line
on stderr (`Resolved.announce`); when none works, one UserError lists what was tried and the flag
that fixes it. A lineage
without a source (stores and priors of older versions) resolves its reference in the current
registry, or as a path from the working directory, as before.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec

from tokenmill.models import converters
from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry import tracking

DIFFUSERS = "diffusers:"
MLFLOW_REFS = ("runs:/", "models:/")


@dataclass(frozen=True)
class Recorded:
    """What a lineage says about its model."""

    uri: str  # the reference it was made with
    sha256: str  # its weights' sha256
    source: dict[str, Any] | None = None  # {"locations": [...], "registry": {...} | None}; None: an older lineage
    version: str | None = None  # "name/3" for a registry model (older lineages' `model_version`)

    @classmethod
    def of_store(cls, lineage: dict[str, Any]) -> "Recorded":
        """A token store's model (`TokenStore.token_attrs()["lineage"]`)."""
        return cls(lineage["model_uri"], lineage["weights_sha256"], lineage.get("model_source"),
                   lineage.get("model_version"))

    @classmethod
    def of_prior(cls, lineage: dict[str, Any]) -> "Recorded":
        """A prior's tokenizer (its `lineage.json`)."""
        return cls(lineage["tokenizer_uri"], lineage["tokenizer_sha256"], lineage.get("tokenizer_source"),
                   lineage.get("tokenizer_version"))


@dataclass(frozen=True)
class Resolved:
    files: Any  # ModelFiles or DiffusersFiles
    where: str  # the location or registry reference it was read from
    how: str  # "recorded location", "recorded registry", "current registry", "recorded reference"
    what: str = "tokenizer"

    @property
    def line(self) -> str:
        """The one line that says which was used."""
        return f"{self.what}: {self.where} ({self.how}, weights sha256 matches)"

    def announce(self) -> None:
        """Print `line` on stderr: callers do once the model is accepted (loaded, fits), so a
        refusal stays one line."""
        print(self.line, file=sys.stderr, flush=True)


# -- recording -------------------------------------------------------------------------------------
def source(files: Any) -> dict[str, Any]:
    """Every way to find `files` again from anywhere: what a lineage records next to the sha256."""
    locations = list(getattr(files, "locations", ()) or ())
    if not locations and not files.uri.startswith(MLFLOW_REFS):
        locations = [absolute_location(files.uri)]
    return {"locations": _unique(locations), "registry": getattr(files, "registry", None)}


def merge_sources(*sources: dict[str, Any] | None) -> dict[str, Any]:
    """The locations of every source in order (no repeats) and the first registry."""
    locations = [loc for s in sources if s for loc in s.get("locations") or []]
    registry = next((s["registry"] for s in sources if s and s.get("registry")), None)
    return {"locations": _unique(locations), "registry": registry}


def absolute_location(ref: str) -> str:
    """A model or store reference that means the same from any working directory: a relative
    local path (also after `diffusers:` or `file://`) made absolute; URLs and MLflow URIs as they are."""
    if converters.is_converted(ref):  # taming:CKPT[,YAML]: each local part made absolute
        prefix, _, rest = ref.partition(":")
        return f"{prefix}:" + ",".join(part if "://" in part else str(Path(part).resolve()) for part in rest.split(","))
    prefix = DIFFUSERS if ref.startswith(DIFFUSERS) else ""
    rest = ref[len(prefix):]
    if rest.startswith(MLFLOW_REFS) or ("://" in rest and not rest.startswith("file://")):
        return ref
    path = Path(rest.removeprefix("file://"))
    if prefix and not path.exists():
        return ref  # a hub id (org/name): found in the Hugging Face cache from anywhere
    return prefix + str(path.resolve())


# -- resolving -------------------------------------------------------------------------------------
def resolve_reference(ref: str, tracking_uri: str | None = None, storage_options: dict | None = None,
                      extra_files: tuple[str, ...] = ()):
    """What a user passes: a `ModelFiles` (folders, URLs, runs:/, models:/ in the current registry:
    `tracking_uri`, else MLFLOW_TRACKING_URI, else this folder's runs/mlflow.db) or
    `DiffusersFiles` (`diffusers:`)."""
    if ref.startswith(DIFFUSERS):
        from tokenmill.pipeline.tokens.diffusers_adapter import resolve_diffusers

        return resolve_diffusers(ref, storage_options)
    from tokenmill.pipeline.registry.model_ref import resolve_model

    return resolve_model(ref, tracking_uri, storage_options, extra_files)


def resolve_recorded(record: Recorded, *, owner: str, fix: str, what: str = "tokenizer",
                     tracking_uri: str | None = None, storage_options: dict | None = None,
                     say: Callable[[str], None] | None = None) -> Resolved:
    """The model `record` names, read from the first place that has it with the recorded weights:
    recorded locations, the recorded registry, the current registry (`tracking_uri`, else the
    defaults of `tracking.current_tracking_uri`). The result's `line` says which (passed to `say`
    when given; else the caller calls `announce()` once it accepts the model); UserError naming
    `owner`, every attempt and `fix` when none works."""
    say = say or (lambda _line: None)
    attempts: list[str] = []
    recorded = record.source or {}
    registry = recorded.get("registry") or None

    tried = set()
    for location in recorded.get("locations") or []:
        tried.add(location)
        found = _attempt(attempts, location, record.sha256,
                         lambda loc=location: _read_location(loc, registry, storage_options))
        if found:
            return _used(say, Resolved(found, location, "recorded location", what))

    if registry and registry.get("uri") and registry.get("tracking_uri"):
        where = f"{registry['uri']} in {registry['tracking_uri']}"
        found = _attempt(attempts, where, record.sha256,
                         lambda: _read_registry(registry["uri"], registry["tracking_uri"], storage_options))
        if found:
            return _used(say, Resolved(found, where, "recorded registry", what))

    current = tracking.current_tracking_uri(tracking_uri)
    ref = _current_ref(record, registry)
    if ref.startswith(MLFLOW_REFS):
        same = registry and registry.get("uri") == ref and registry.get("tracking_uri") == current
        if not same:
            where = f"{ref} in {current or _mlflow_default()}"
            found = _attempt(attempts, where, record.sha256, lambda: _read_registry(ref, current, storage_options))
            if found:
                return _used(say, Resolved(found, where, "current registry", what))
    elif ref and absolute_location(ref) not in tried:  # an older lineage's path or URL, read as before
        found = _attempt(attempts, ref, record.sha256, lambda: resolve_reference(ref, current, storage_options))
        if found:
            return _used(say, Resolved(found, ref, "recorded reference", what))

    raise UserError(f"cannot find the {what} of {owner} (weights sha256 {record.sha256[:12]}…); tried "
                    f"{'; '.join(attempts) or 'nothing (the lineage names no model)'}; {fix}")


def _current_ref(record: Recorded, registry: dict[str, Any] | None) -> str:
    """The reference to look up in the current registry: the recorded version pinned (an alias may
    have moved since), else the reference as recorded."""
    if registry and registry.get("uri"):
        return registry["uri"]
    if record.uri.startswith("models:/") and record.version and "/" in record.version:
        name, number = record.version.rsplit("/", 1)
        return f"models:/{name}/{number}"
    return record.uri


def _read_location(location: str, registry: dict[str, Any] | None, storage_options: dict | None):
    """The model folder at a recorded location: a path, an fsspec URL, `diffusers:…`, `taming:…`, or an
    MLflow artifact URI that only MLflow reads (`mlflow-artifacts:/…`: through the recorded store)."""
    if location.startswith(DIFFUSERS) or converters.is_converted(location):
        return resolve_reference(location, None, storage_options)
    scheme = re.match(r"([a-zA-Z][\w+.-]+):/", location)  # also `mlflow-artifacts:/…`, which has no "//"
    protocol = fsspec.core.split_protocol(location)[0] if "://" in location else (scheme and scheme.group(1))
    if protocol in (None, "file", "local"):
        path = Path(location.removeprefix("file://"))
        if not path.is_dir():
            raise _Missing("no such folder")
        return resolve_reference(str(path), None, storage_options)
    if protocol in fsspec.available_protocols():
        try:
            return resolve_reference(location, None, storage_options)
        except (FileNotFoundError, UserError) as err:
            if "is not a model directory" in str(err) or isinstance(err, FileNotFoundError):
                raise _Missing("no model there") from None
            raise
    from tokenmill.pipeline.registry.model_ref import download_artifact

    store = (registry or {}).get("tracking_uri") or tracking.current_tracking_uri()
    _require_store(store)
    return download_artifact(location, store)


def _read_registry(ref: str, tracking_uri: str | None, storage_options: dict | None):
    _require_store(tracking_uri)
    return resolve_reference(ref, tracking_uri, storage_options)


def _require_store(tracking_uri: str | None) -> None:
    """Refuse a SQLite store whose file is not there (opening it would create an empty one) and a
    server that does not answer (MLflow's client would retry for minutes)."""
    if tracking.missing_store(tracking_uri):
        raise _Missing("no such tracking store")
    try:
        tracking.require_reachable(tracking_uri or "", timeout=5)
    except UserError:
        raise _Missing("server not reachable") from None


def _mlflow_default() -> str:
    import mlflow

    return tracking.absolute_tracking_uri(mlflow.get_tracking_uri())


class _Missing(Exception):
    """Nothing at this place (a short reason for the list of attempts)."""


def _attempt(attempts: list[str], where: str, sha256: str, read: Callable[[], Any]) -> Any:
    """`read()`'s files when their weights hash to `sha256`; else None, with the reason appended."""
    try:
        files = read()
    except _Missing as err:
        attempts.append(f"{where} ({err})")
        return None
    except (UserError, OSError, ValueError) as err:
        attempts.append(f"{where} ({_reason(err)})")
        return None
    if files.weights_sha256 != sha256:
        attempts.append(f"{where} (its weights sha256 {files.weights_sha256[:12]}… differ)")
        return None
    return files


def _reason(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "not found" in text.lower() or "RESOURCE_DOES_NOT_EXIST" in text:
        return "not found"
    if "neither a directory" in text:
        return "no such folder"
    return text if len(text) <= 160 else text[:157] + "..."


def _used(say: Callable[[str], None], resolved: Resolved) -> Resolved:
    say(resolved.line)
    return resolved


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))
