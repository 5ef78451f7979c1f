"""The typed config of `tokenmill train-prior`: which token store, which Transformer, how long.

`optim`, `train` (the engine's loop section), `scaling`, `run` and `tracking` are the sections
every training job has (`pipeline.training.config.JobConfig`: same keys, same meaning); `model`
holds the fields of every prior kind (`PRIOR_CONFIGS`: `kind: prior` is `models.prior.PriorConfig`,
`kind: maskgit` `models.masked_prior.MaskGITConfig`, `kind: var` `models.var_prior.VARConfig`), of
which a config may set only its kind's (the fields it leaves out take its kind's defaults);
the vocabulary (`codebook_size`), the code grid (`grid`) and the number of classes may be left
out: they are read from the store. `prior_config(fields)` builds the kind's config dataclass.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import pydantic

from tokenmill.models.masked_prior import MaskGITConfig
from tokenmill.models.prior import PriorConfig
from tokenmill.models.var_prior import VARConfig
from tokenmill.pipeline.config import StrictModel, load_config
from tokenmill.pipeline.training.config import JobConfig, LoopSection, RunSection, TrackingSection
from tokenmill.pipeline.training.optim import OptimConfig

FROM_STORE = ("codebook_size", "num_classes", "grid")  # None in the config: the store's


class PriorDataSection(StrictModel):
    store: str  # a finished code store: a local path or any fsspec URL (s3://...)
    storage_options: dict[str, Any] = {}
    train_split: str = "train"
    val_split: str = "val"
    # A split that fits in this many MiB is read once into memory and shuffled per row; a bigger
    # one streams through the chunk cache with a chunk-level shuffle (see pipeline/prior/data.py).
    cache_mb: float = pydantic.Field(1024, gt=0)
    shuffle_window_chunks: int = pydantic.Field(16, gt=0)  # rows are shuffled within this many chunks
    # Batches read ahead of the step by a background thread (0: read on the training thread).
    prefetch_batches: int = pydantic.Field(4, ge=0)
    read_threads: int = pydantic.Field(8, gt=0)  # chunks a streamed batch misses are fetched this many at once
    # A remote (s3://...) store's chunks are shared by the ranks of a node through this local folder
    # (None: /dev/shm/tokenmill-chunks, or the temp dir without /dev/shm), at most node_cache_mb; 0 turns it off.
    node_cache_dir: Optional[str] = None
    node_cache_mb: float = pydantic.Field(4096, ge=0)
    val_max_items: Optional[int] = pydantic.Field(None, gt=0)  # None: the whole validation split
    # A local folder: each rank appends the items it reads to rank<r>.txt (an audit; tests use it).
    item_log: Optional[str] = None


PRIOR_CONFIGS: dict[str, type[PriorConfig]] = {"prior": PriorConfig, "maskgit": MaskGITConfig, "var": VARConfig}


def kind_fields(kind: str) -> set[str]:
    return {field.name for field in dataclasses.fields(PRIOR_CONFIGS[kind])}


def check_kind_fields(kind: str, names: Iterable[str]) -> None:
    """ValueError (one line) on an unknown kind or a field that `kind`'s config does not have."""
    if kind not in PRIOR_CONFIGS:
        raise ValueError(f"kind {kind!r} is not a prior kind; use one of {', '.join(PRIOR_CONFIGS)}")
    foreign = sorted(set(names) - kind_fields(kind))
    if foreign:
        owners = [k for k in PRIOR_CONFIGS if foreign[0] in kind_fields(k)]
        raise ValueError(f"{foreign[0]} is not a field of a `kind: {kind}` prior; remove it"
                         + (f" or set kind: {owners[0]}" if owners else ""))


def prior_config(fields: dict[str, Any]) -> PriorConfig:
    """The config dataclass of the kind `fields["kind"]` names (default "prior"), built from `fields`
    (its own checks run too); ValueError on a field that kind does not have."""
    kind = fields.get("kind", "prior")
    check_kind_fields(kind, fields)
    return PRIOR_CONFIGS[kind](**fields)


class _PriorModelBase(StrictModel):
    @pydantic.model_validator(mode="after")
    def _only_its_kinds_fields(self) -> "_PriorModelBase":
        check_kind_fields(self.kind, self.model_fields_set)  # e.g. sample_steps on `kind: prior`
        return self

    @pydantic.model_serializer(mode="wrap")
    def _dump_its_kinds_fields(self, handler: Any, info: pydantic.SerializationInfo) -> dict[str, Any]:
        """Dumps (MLflow params) show only the kind's fields, each unset one with the kind's own
        default (VAR's `positions` is not the AR prior's); FROM_STORE stay None: the store's."""
        own = {f.name: f for f in dataclasses.fields(PRIOR_CONFIGS[self.kind])}
        dumped = {name: value for name, value in handler(self).items() if name in own}
        for name in set() if info.exclude_unset else own.keys() - self.model_fields_set - set(FROM_STORE):
            field = own[name]
            dumped[name] = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        return dumped

    def config_fields(self) -> dict[str, Any]:
        """The fields the config sets (its kind's dataclass defaults fill in the rest)."""
        return self.model_dump(exclude_unset=True)


def _model_section() -> type[StrictModel]:
    """A config section with the fields, types and defaults of every PRIOR_CONFIGS class (the
    first that has a field gives its default; a kind's own defaults apply when it is built), `kind`
    one of their kinds, and FROM_STORE defaulting to None: the store's."""
    fields: dict[str, Any] = {"kind": (Literal[tuple(PRIOR_CONFIGS)], "prior")}
    for config_class in PRIOR_CONFIGS.values():
        hints = typing.get_type_hints(config_class, include_extras=True)  # with models.ranges' bounds
        for field in dataclasses.fields(config_class):
            if field.name in fields:
                continue
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            if field.name in FROM_STORE:
                fields[field.name] = (Optional[hints[field.name]], None)
            else:
                fields[field.name] = (hints[field.name], default)
    return pydantic.create_model("PriorModelSection", __base__=_PriorModelBase, **fields)


PriorModelSection = _model_section()


class PriorTrainSection(LoopSection):
    sample_every: Optional[int] = pydantic.Field(1000, ge=0)  # sample grids; 0: none during training


class PriorSampleSection(StrictModel):
    """The sample grids logged during training: `per_class` samples in one row per class."""

    per_class: int = pydantic.Field(8, gt=0)
    rows: int = pydantic.Field(10, gt=0)  # unconditional priors: rows of `per_class` samples
    cfg_scale: float = pydantic.Field(1.0, ge=0)
    temperature: float = pydantic.Field(1.0, gt=0)
    top_k: Optional[int] = pydantic.Field(None, gt=0)


class PriorJobConfig(JobConfig):
    data: PriorDataSection
    model: PriorModelSection = PriorModelSection()  # type: ignore[valid-type]
    optim: OptimConfig = OptimConfig(lr=3e-4, weight_decay=0.01, grad_clip=1.0, ema_decay=0.0)
    train: PriorTrainSection = PriorTrainSection()
    sample: PriorSampleSection = PriorSampleSection()
    run: RunSection = RunSection(name="prior")
    tracking: TrackingSection = TrackingSection(experiment="tokenmill-prior")


def load_prior_config(path: str | Path | None, overrides: list[str] = ()) -> PriorJobConfig:
    return load_config(PriorJobConfig, path, overrides)
