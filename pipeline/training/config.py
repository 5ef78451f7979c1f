"""The typed config of `tokenmill train`: one section per component.

The `model` section is a tagged union (on `kind`) of every registered model's own config
dataclass, so adding a model class adds its config here automatically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import pydantic

import models  # noqa: F401 - registers every model class
from models.schedules import KLSchedule
from models.serialization import registered_models
from models.training import OptimConfig
from models.vqgan_loss import VQGANLossConfig
from pipeline.config import StrictModel, load_config
from pipeline.shards.images import TransformConfig


def _model_union() -> Any:
    config_classes = tuple(cls.config_class for cls in registered_models().values())
    return Annotated[Union[config_classes], pydantic.Field(discriminator="kind")]


ModelConfig = _model_union()


class DataSection(StrictModel):
    # A shard directory/URL with manifest.json, or a built-in source (`builtin:mnist5k`) that is
    # sharded once into `<run.root>/shards/<name>` before training.
    shards: str = "builtin:mnist5k"
    train_split: str = "train"
    val_split: str = "val"
    transform: TransformConfig = TransformConfig()
    shuffle_buffer: int = 1024
    storage_options: dict[str, Any] = {}


class EarlyStopSection(StrictModel):
    metric: Optional[str] = None  # e.g. "val/psnr" or "val/nll_nats"; None disables early stopping
    mode: Literal["min", "max"] = "min"
    patience: int = 3  # validations without improvement before stopping


class TrainSection(StrictModel):
    steps: int = pydantic.Field(2000, gt=0)
    batch_size: int = pydantic.Field(64, gt=0)  # per worker
    seed: int = 0
    bf16: bool = False  # shorthand for precision: bf16
    # Autocast of the forward pass: fp32 (none), bf16, or fp16 (with a GradScaler). Quantizer
    # distances and codebook statistics stay fp32 whatever this says.
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None
    log_every: int = pydantic.Field(20, gt=0)
    val_every: int = pydantic.Field(500, gt=0)
    checkpoint_every: int = pydantic.Field(500, gt=0)
    iw_samples: int = pydantic.Field(16, gt=0)  # K of the importance-weighted NLL (VAE family)
    # Warm start: a model (directory/URL, runs:/…, models:/NAME/VERSION) of the same architecture
    # whose weights replace the fresh initialisation; a checkpoint being resumed wins over it.
    init_from: Optional[str] = None
    early_stop: EarlyStopSection = EarlyStopSection()

    def resolved_precision(self) -> str:
        return self.precision or ("bf16" if self.bf16 else "fp32")


class ScalingSection(StrictModel):
    num_workers: int = pydantic.Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


class RunSection(StrictModel):
    name: str = "tokenmill"
    # Local directory for the run's SQLite MLflow store, exported model and built-in shards.
    root: str = "runs"
    # Where Ray Train keeps checkpoints (local path or s3://...); default <root>/ray.
    storage_path: Optional[str] = None
    max_failures: int = 2
    keep_checkpoints: int = 2
    # On a multi-node Ray cluster local paths are refused (pipeline.training.cluster_check) unless
    # they are on a filesystem every node mounts at the same path (NFS): then set this true.
    shared_storage: bool = False

    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    def resolved_storage_path(self) -> str:
        if self.storage_path:
            return self.storage_path
        return str((Path(self.root) / "ray").resolve())


class TrackingSection(StrictModel):
    tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else SQLite under the run dir
    experiment: str = "tokenmill"
    registered_model: Optional[str] = None  # default: the run name
    log_images: bool = True


class TrainJobConfig(StrictModel):
    model: ModelConfig  # type: ignore[valid-type]
    data: DataSection = DataSection()
    optim: OptimConfig = OptimConfig()  # total_steps 0 means train.steps
    kl: KLSchedule = KLSchedule()  # used by models with a KL term only
    loss: Optional[VQGANLossConfig] = None  # perceptual + adversarial terms (VQGAN); None: the model's own loss
    train: TrainSection = TrainSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    tracking: TrackingSection = TrackingSection()


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainJobConfig:
    return load_config(TrainJobConfig, path, overrides)
