"""The typed config of `tokenmill train-prior`: which token store, which Transformer, how long.

`optim`, `scaling`, `run` and `tracking` are the sections `tokenmill train` has (same keys, same
meaning); `model` holds `models.prior.PriorConfig`'s fields, where the vocabulary (`codebook_size`),
the code grid (`grid`) and the number of classes may be left out: they are read from the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import pydantic

from models.prior import PriorConfig
from models.training import OptimConfig
from pipeline.config import StrictModel, load_config
from pipeline.training.config import RunSection, ScalingSection, TrackingSection


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


class PriorModelSection(StrictModel):
    """`models.prior.PriorConfig`'s fields and defaults; the first three default to the store's."""

    kind: Literal["prior"] = "prior"
    codebook_size: Optional[int] = pydantic.Field(None, gt=0)  # None: the store's
    num_classes: Optional[int] = pydantic.Field(None, ge=0)  # None: the store's labels; 0: unconditional
    grid: Optional[list[list[int]]] = None  # [[h, w]] per level; None: the store's
    dim: int = pydantic.Field(PriorConfig.dim, gt=0)
    depth: int = pydantic.Field(PriorConfig.depth, gt=0)
    heads: int = pydantic.Field(PriorConfig.heads, gt=0)
    mlp_ratio: float = pydantic.Field(PriorConfig.mlp_ratio, gt=0)
    positions: Literal["learned", "rope2d"] = PriorConfig.positions
    rope_base: float = pydantic.Field(PriorConfig.rope_base, gt=0)
    label_dropout: float = pydantic.Field(PriorConfig.label_dropout, ge=0, lt=1)  # classifier-free guidance needs some
    dropout: float = pydantic.Field(PriorConfig.dropout, ge=0, lt=1)
    tie_weights: bool = PriorConfig.tie_weights
    norm: Literal["layernorm", "rmsnorm"] = PriorConfig.norm


class PriorTrainSection(StrictModel):
    steps: int = pydantic.Field(2000, gt=0)
    batch_size: int = pydantic.Field(64, gt=0)  # per worker
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = pydantic.Field(20, gt=0)
    val_every: int = pydantic.Field(500, gt=0)
    checkpoint_every: int = pydantic.Field(500, gt=0)
    sample_every: int = pydantic.Field(1000, ge=0)  # 0: no sample grids during training


class PriorSampleSection(StrictModel):
    """The sample grids logged during training: `per_class` samples in one row per class."""

    per_class: int = pydantic.Field(8, gt=0)
    rows: int = pydantic.Field(10, gt=0)  # unconditional priors: rows of `per_class` samples
    cfg_scale: float = pydantic.Field(1.0, ge=0)
    temperature: float = pydantic.Field(1.0, gt=0)
    top_k: Optional[int] = pydantic.Field(None, gt=0)


class PriorJobConfig(StrictModel):
    data: PriorDataSection
    model: PriorModelSection = PriorModelSection()
    optim: OptimConfig = OptimConfig(lr=3e-4, weight_decay=0.01, grad_clip=1.0, ema_decay=0.0)
    train: PriorTrainSection = PriorTrainSection()
    sample: PriorSampleSection = PriorSampleSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection(name="prior")
    tracking: TrackingSection = TrackingSection(experiment="tokenmill-prior")


def load_prior_config(path: str | Path | None, overrides: list[str] = ()) -> PriorJobConfig:
    return load_config(PriorJobConfig, path, overrides)
