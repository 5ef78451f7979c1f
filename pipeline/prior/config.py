"""The typed config of `tokenmill train-prior`: which token store, which Transformer, how long.

`optim`, `train` (the engine's loop section), `scaling`, `run` and `tracking` are the sections
every training job has (`pipeline.training.config.JobConfig`: same keys, same meaning); `model`
holds `models.prior.PriorConfig`'s fields and defaults, where the vocabulary (`codebook_size`),
the code grid (`grid`) and the number of classes may be left out: they are read from the store.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Optional

import pydantic

from models.prior import PriorConfig
from pipeline.config import StrictModel, load_config
from pipeline.training.config import JobConfig, LoopSection, RunSection, TrackingSection
from pipeline.training.optim import OptimConfig

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
    val_max_items: Optional[int] = pydantic.Field(None, gt=0)  # None: the whole validation split
    # A local folder: each rank appends the items it reads to rank<r>.txt (an audit; tests use it).
    item_log: Optional[str] = None


def _model_section() -> type[StrictModel]:
    """A config section with PriorConfig's fields, types and defaults (its own checks run when the
    driver builds the PriorConfig), except FROM_STORE, which default to None: the store's."""
    hints = typing.get_type_hints(PriorConfig)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(PriorConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if field.name in FROM_STORE:
            fields[field.name] = (Optional[hints[field.name]], None)
        else:
            fields[field.name] = (hints[field.name], default)
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
