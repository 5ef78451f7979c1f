"""The typed configs of the training engine: one section per component.

`JobConfig` holds the sections every task shares (optim, the loop's `train`, scaling, run,
tracking); `TrainJobConfig` is `tokenmill train`'s (tokenizers), `pipeline.prior.config.PriorJobConfig`
`tokenmill train-prior`'s. The tokenizer's `model` section is a tagged union (on `kind`) of every registered model's own config
dataclass, so adding a model class adds its config here automatically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import pydantic

import tokenmill.models  # noqa: F401 - registers every model class
from tokenmill.models.lpips import LPIPSWeights
from tokenmill.models.ranges import STRICT, Count, Fraction, NonNegative
from tokenmill.models.schedules import KLSchedule
from tokenmill.models.serialization import registered_models
from tokenmill.models.vqgan_loss import DiscriminatorConfig
from tokenmill.pipeline.config import StrictModel, load_config
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.training.optim import OptimConfig
from tokenmill.pipeline.training.precision import Precision


def _model_union() -> Any:
    config_classes = tuple(cls.config_class for cls in registered_models().values())
    return Annotated[Union[config_classes], pydantic.Field(discriminator="kind")]


ModelConfig = _model_union()


def _disc_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, betas=(0.5, 0.9), grad_clip=1.0, ema_decay=0.0)


@dataclass
class VQGANLossConfig:
    """The `loss` section: perceptual and adversarial terms (taming's `vqperceptual.py`, without
    its legacy flags); `pipeline.training.tasks.adversarial` trains with it."""

    perceptual_weight: NonNegative = 1.0  # LPIPS (VGG); > 0 needs the weight files (models.lpips)
    perceptual: LPIPSWeights = field(default_factory=LPIPSWeights)
    adversarial_weight: NonNegative = 0.5  # taming's disc_weight; 0 turns the discriminator off
    adversarial_loss: Literal["hinge", "non-saturating"] = "hinge"
    adaptive_weight: bool = True  # scale the GAN term by |grad nll| / |grad gan| at the decoder's last layer
    disc_start: Count = 0  # optimizer steps before the discriminator (and the generator's GAN term) start
    lecam_weight: NonNegative = 0.0  # LeCAM regulariser on the discriminator; 0 = off
    lecam_decay: Fraction = 0.999  # EMA of the discriminator's mean outputs
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    disc_optim: OptimConfig = field(default_factory=_disc_optim)  # its EMA is always off

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:  # YAML / checkpoints give dicts
        if isinstance(self.perceptual, dict):
            self.perceptual = LPIPSWeights(**self.perceptual)
        if isinstance(self.discriminator, dict):
            self.discriminator = DiscriminatorConfig(**self.discriminator)
        if isinstance(self.disc_optim, dict):
            self.disc_optim = OptimConfig(**self.disc_optim)

    @property
    def uses_discriminator(self) -> bool:
        return self.adversarial_weight > 0


class DataSection(StrictModel):
    # A shard directory/URL with manifest.json, or a built-in source (`builtin:mnist5k`) that is
    # sharded once into `<run.root>/shards/<name>` before training.
    shards: str = "builtin:mnist5k"
    train_split: str = "train"
    val_split: str = "val"
    transform: TransformConfig = TransformConfig()
    shuffle_buffer: int = pydantic.Field(1024, ge=0)  # samples; 0: no local shuffle
    storage_options: dict[str, Any] = {}


class EarlyStopSection(StrictModel):
    metric: Optional[str] = None  # e.g. "val/psnr" or "val/nll_nats"; None disables early stopping
    mode: Literal["min", "max"] = "min"
    patience: int = pydantic.Field(3, gt=0)  # validations without improvement before stopping


class LoopSection(StrictModel):
    """The `train` section every task shares: what the engine's loop does, and when."""

    steps: int = pydantic.Field(2000, gt=0)  # optimizer steps
    batch_size: int = pydantic.Field(64, gt=0)  # per worker and micro-batch
    # Micro-batches per optimizer step (gradient accumulation): a step sees
    # batch_size x accumulate x num_workers examples.
    accumulate: int = pydantic.Field(1, gt=0)
    seed: int = pydantic.Field(0, ge=0)  # numpy seeds (the prior's epoch order) are non-negative
    # Autocast of the forward: auto = bf16 on CUDA, fp32 on CPU (pipeline.training.precision).
    precision: Precision = "auto"
    # torch.compile every trained module with this backend (inductor: worth it on GPUs for long
    # runs; its first steps compile for minutes); None: no compilation.
    compile: Optional[Literal["inductor", "cudagraphs", "aot_eager", "eager"]] = None
    log_every: int = pydantic.Field(20, gt=0)
    val_every: int = pydantic.Field(500, gt=0)
    checkpoint_every: int = pydantic.Field(500, gt=0)
    # Image panels / sample grids (rank 0, to MLflow): None = at every validation, 0 = never,
    # N = every N steps and at the last step.
    sample_every: Optional[int] = pydantic.Field(None, ge=0)
    # Warm start: a model (directory/URL, runs:/…, models:/NAME/VERSION, taming:PATH) of the same architecture
    # whose weights replace the fresh initialisation; a checkpoint being resumed wins over it.
    init_from: Optional[str] = None
    early_stop: EarlyStopSection = EarlyStopSection()


class TrainSection(LoopSection):
    """`tokenmill train`'s `train` section: the loop's, plus the VAE family's validation."""

    iw_samples: int = pydantic.Field(16, gt=0)  # K of the importance-weighted NLL (VAE family)


class ScalingSection(StrictModel):
    num_workers: int = pydantic.Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = pydantic.Field(1.0, ge=0)  # Ray's num_CPUs per worker (fractions allowed)
    # Train on one rank inside this process, without Ray (num_workers and cpus_per_worker do not
    # apply): step through it with a debugger or a profiler, or run a quick experiment.
    in_process: bool = False


class RunSection(StrictModel):
    name: str = "tokenmill"
    # Local directory for the run's exported model and built-in shards; the project's SQLite MLflow
    # store (the default) is beside the runs: `<top folder of a relative root>/mlflow.db`.
    root: str = "runs"
    # Where Ray Train keeps checkpoints (local path or s3://...); default <root>/ray.
    storage_path: Optional[str] = None
    max_failures: int = pydantic.Field(2, ge=-1)  # Ray Train's FailureConfig: -1 retries forever
    keep_checkpoints: int = pydantic.Field(2, gt=0)
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
    tracking_uri: Optional[str] = None  # default: MLFLOW_TRACKING_URI, else the project's SQLite beside the runs
    experiment: str = "tokenmill"
    registered_model: Optional[str] = None  # default: the run name
    log_images: bool = True


class JobConfig(StrictModel):
    """The sections every training job has; each task's config adds its model and data."""

    optim: OptimConfig = OptimConfig()  # total_steps 0 means train.steps
    train: LoopSection = LoopSection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    tracking: TrackingSection = TrackingSection()


class TrainJobConfig(JobConfig):
    """`tokenmill train`: a tokenizer (VAE or VQ family; with a `loss` section, a VQGAN)."""

    model: ModelConfig  # type: ignore[valid-type]
    data: DataSection = DataSection()
    kl: KLSchedule = KLSchedule()  # used by models with a KL term only
    loss: Optional[VQGANLossConfig] = None  # perceptual + adversarial terms (VQGAN); None: the model's own loss
    train: TrainSection = TrainSection()


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainJobConfig:
    return load_config(TrainJobConfig, path, overrides)
