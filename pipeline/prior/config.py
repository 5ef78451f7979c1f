"""The typed config of `tokenmill train-prior`: which token store, which Transformer, how long.

`optim`, `train` (the engine's loop section), `scaling`, `run` and `tracking` are the sections
every training job has (`pipeline.training.config.JobConfig`: same keys, same meaning); `model`
holds the fields of every prior kind (`PRIOR_CONFIGS`: `kind: prior` = `models.prior.PriorConfig`,
`kind: var` = `models.var_prior.VARConfig`). A field left out (None) takes its kind's default;
the vocabulary (`codebook_size`), the code grid (`grid`) and the number of classes are read from
the store. `prior_config(fields)` builds the kind's config and refuses a field that kind lacks.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic

from models.prior import PriorConfig
from models.var_prior import VARConfig
from pipeline.config import StrictModel, load_config
from pipeline.training.config import JobConfig, LoopSection, RunSection, TrackingSection
from pipeline.training.optim import OptimConfig

FROM_STORE = ("codebook_size", "num_classes", "grid")  # None in the config: the store's
PRIOR_CONFIGS: dict[str, type[PriorConfig]] = {"prior": PriorConfig, "var": VARConfig}  # kind -> config


class PriorDataSection(StrictModel):
    store: str  # a finished code store: a local path or any fsspec URL (s3://...)
    storage_options: dict[str, Any] = {}
    train_split: str = "train"
    val_split: str = "val"
    # A split that fits in this many MiB is read once into memory and shuffled per row; a bigger
    # one streams through the chunk cache with a chunk-level shuffle (see pipeline/prior/data.py).
    cache_mb: float = pydantic.Field(1024, gt=0)
    shuffle_window_chunks: int = pydantic.Field(16, gt=0)  # rows are shuffled within this many chunks
    val_max_items: Optional[int] = pydantic.Field(None, gt=0)  # None: the whole validation split
    # A local folder: each rank appends the items it reads to rank<r>.txt (an audit; tests use it).
    item_log: Optional[str] = None


def prior_config(fields: dict[str, Any]) -> PriorConfig:
    """The config of the prior kind `fields["kind"]` from the model section's fields: None (left
    out) takes the kind's default; a field that kind does not have is a one-line ValueError."""
    kind = fields.get("kind") or "prior"
    if kind not in PRIOR_CONFIGS:
        raise ValueError(f"kind {kind!r} is not a prior kind; use one of {', '.join(PRIOR_CONFIGS)}")
    config_class = PRIOR_CONFIGS[kind]
    own = {f.name for f in dataclasses.fields(config_class)}
    given = {name: value for name, value in fields.items() if value is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        raise ValueError(f"{foreign[0]!r} is not a field of kind {kind!r}; remove it or pick a kind that has it")
    return config_class(**{**given, "kind": kind})


def _model_section() -> type[StrictModel]:
    """A config section with the union of every prior kind's fields, each Optional with default
    None: the kind's own default (or, for FROM_STORE, the store's); the kind's checks run when the
    driver builds its config (`prior_config`)."""
    types: dict[str, list[Any]] = {}
    for config_class in PRIOR_CONFIGS.values():
        hints = typing.get_type_hints(config_class)
        for field in dataclasses.fields(config_class):
            seen = types.setdefault(field.name, [])
            if field.name != "kind" and hints[field.name] not in seen:
                seen.append(hints[field.name])
    fields: dict[str, Any] = {"kind": (Literal[tuple(PRIOR_CONFIGS)], "prior")}
    fields |= {name: (Optional[Union[tuple(hints)]], None) for name, hints in types.items() if name != "kind"}
    return pydantic.create_model("PriorModelSection", __base__=StrictModel, **fields)


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
