"""The typed config of `tokenmill retrain`: a train config for the challenger plus four sections.

The top level is exactly a `tokenmill train` config (model, data, optim, kl, train, scaling, run,
tracking: same keys, same `--set train.steps=…` overrides) with:

    versions:    where data versions live: every sub-folder of `prefix` holding a manifest.json
                 is one version, named by its folder; the newest is the lexically greatest name
                 (use sortable names: `2025-06-01`, `v000042`). Folder names, not timestamps or
                 mtimes, so "newest" is the same on every machine and under any clock skew.
    validation:  the fixed shards challenger and champion are both scored on.
    promotion:   the metric that decides (and its direction), the margin the challenger must win
                 by, the alias it moves, the lock.
    retokenize:  where the new champion's versioned token stores go.

`data.shards` is chosen by retrain (the newest version) and must not be set; the registered
model is `tracking.registered_model` (required).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import pydantic

from tokenmill.models.lpips import LPIPSWeights
from tokenmill.models.serialization import model_class_for_kind
from tokenmill.pipeline.config import ConfigError, StrictModel, load_config
from tokenmill.pipeline.training.config import TrainJobConfig

# The score each model family is judged by on the fixed validation shards (pipeline.training.tasks.image_validation).
VQ_METRIC, VAE_METRIC = "val/psnr", "val/nll_nats"


class VersionsSection(StrictModel):
    prefix: str  # fsspec URL; its sub-folders with a manifest.json are the data versions


class ValidationSection(StrictModel):
    # Fixed shard folder/URL with manifest.json, never a data version being trained on; or
    # builtin:NAME, sharded once under run.root/shards/NAME (a laptop preset needs no extra step).
    shards: str
    split: str = "val"
    batch_size: int = pydantic.Field(256, gt=0)
    iw_samples: int = pydantic.Field(64, gt=0)  # K of the importance-weighted NLL (VAE family)
    seed: int = pydantic.Field(0, ge=0)  # seeds the IW samples so a model's score is reproducible


# promotion.metric -> (its key in the scores, higher is better). `val/` metrics come from the
# fixed validation shards (pipeline.registry.promotion); `downstream/` ones from a model trained
# on each tokenizer's tokens of them (pipeline.registry.downstream).
METRICS = {
    "psnr": (VQ_METRIC, True), "ssim": ("val/ssim", True), "usage": ("val/usage", True),
    "nll_nats": (VAE_METRIC, False), "lpips": ("val/lpips", False), "rfid": ("val/rfid", False),
    "prior_bits": ("downstream/prior_bits", False), "gfid": ("downstream/gfid", False),
}
INCEPTION_METRICS = ("rfid", "gfid")  # need FID's Inception weights (promotion.inception)


class InceptionSection(StrictModel):
    """`promotion.inception`: torch-fidelity's FID Inception weights for metric rfid (a local path
    or fsspec URL; None: the torch hub cache), and their sha256 or a prefix (None: the published one)."""

    path: Optional[str] = None
    sha256: Optional[str] = None


class PriorBudget(StrictModel):
    """`promotion.prior`: the fixed budget of the small prior behind `prior_bits`, the same for
    both models: trained on each model's tokens of the validation shards' `train_split`, scored
    (bits per token) on `validation.split`."""

    train_split: str = "train"
    steps: int = pydantic.Field(200, gt=0)
    batch_size: int = pydantic.Field(32, gt=0)
    dim: int = pydantic.Field(64, gt=0)
    depth: int = pydantic.Field(2, gt=0)
    heads: int = pydantic.Field(2, gt=0)
    lr: float = pydantic.Field(3e-3, gt=0)
    seed: int = pydantic.Field(0, ge=0)


class PromotionSection(StrictModel):
    alias: str = "champion"
    # What decides: a name of METRICS (None: psnr for the VQ family, nll_nats for VAEs), and
    # whether higher wins (None: the metric's known direction).
    metric: Optional[str] = None
    direction: Optional[Literal["max", "min"]] = None
    # How much better the challenger must be, in the metric's unit (dB of PSNR, nats per image of
    # the IW-NLL, bits per token of prior_bits, ...).
    margin: float = pydantic.Field(0.0, ge=0.0)
    prior: PriorBudget = PriorBudget()  # metric prior_bits
    lpips: LPIPSWeights = LPIPSWeights()  # metric lpips: the VGG and linear-head weight files
    inception: InceptionSection = InceptionSection()  # metric rfid: FID's Inception weights
    # VQ family: the challenger's codebook usage (fraction of codes used over the whole split,
    # lowest level for two-level models) must reach this, so a collapsed codebook never wins.
    usage_floor: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    warm_start: bool = True  # challenger starts from the champion's weights (same architecture)
    # The promotion lock: a holder that has not released it after lock_expiry_s is presumed dead.
    # It must exceed the time to evaluate both models (the critical section), not the training.
    lock_expiry_s: int = pydantic.Field(3600, gt=0)
    lock_wait_s: int = pydantic.Field(900, ge=0)  # how long a run waits for another's lock


class RetokenizeSection(StrictModel):
    # The store of a promotion: <out_prefix>/<data version>/<registered model>-v<model version>
    out_prefix: str
    batch_size: int = pydantic.Field(256, gt=0)
    actors: Optional[int] = pydantic.Field(None, gt=0)  # most actors; default: one per GPU, else per CPU, of the cluster
    gpus: Optional[int] = pydantic.Field(None, ge=0)  # GPU actors up to N (0: CPU); default: GPUs if the cluster has any
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class RetrainConfig(TrainJobConfig):
    versions: VersionsSection
    validation: ValidationSection
    promotion: PromotionSection = PromotionSection()
    retokenize: RetokenizeSection

    @pydantic.field_validator("data")
    @classmethod
    def _retrain_picks_the_shards(cls, data):
        if "shards" in data.model_fields_set:
            raise ValueError("data.shards is chosen by retrain (the newest version under versions.prefix); remove it")
        return data

    @pydantic.field_validator("tracking")
    @classmethod
    def _model_is_named(cls, tracking):
        if not tracking.registered_model:
            raise ValueError("tracking.registered_model is required: it names the model whose alias retrain moves")
        return tracking

    @pydantic.field_validator("promotion")
    @classmethod
    def _floor_is_for_vq(cls, promotion, info: pydantic.ValidationInfo):
        model = info.data.get("model")
        if model is not None and _is_vae(model.kind) and promotion.usage_floor:
            raise ValueError("promotion.usage_floor applies to VQ models only; VAEs are judged by IW-NLL")
        return promotion

    @pydantic.field_validator("promotion")
    @classmethod
    def _metric_is_known(cls, promotion):
        if promotion.metric is not None and promotion.metric not in METRICS:
            raise ValueError(f"promotion.metric {promotion.metric!r} is not one of {', '.join(METRICS)}")
        return promotion

    @property
    def is_vae(self) -> bool:
        return _is_vae(self.model.kind)

    @property
    def metric_name(self) -> str:
        """The name of the deciding metric (promotion.metric, else the model family's)."""
        return self.promotion.metric or ("nll_nats" if self.is_vae else "psnr")

    @property
    def metric(self) -> str:
        """The deciding metric's key in the scores."""
        return METRICS[self.metric_name][0]

    @property
    def higher_is_better(self) -> bool:
        direction = self.promotion.direction
        return METRICS[self.metric_name][1] if direction is None else direction == "max"

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model  # type: ignore[return-value] - required by _check

    def challenger_config(self, shards: str, run_name: str, init_from: str | None,
                          tracking_uri: str) -> TrainJobConfig:
        """The `tokenmill train` config of one challenger: the train sections of this config on
        data version `shards`, under its own run name, optionally warm-started, tracked where
        retrain tracks (the store retrain resolved: its config's, MLFLOW_TRACKING_URI or the project's).
        `init_from` (the champion) wins over the configured `train.init_from` (e.g. `taming:…`, the
        start of the first challenger)."""
        plain = self.model_dump(mode="json", include=set(TrainJobConfig.model_fields))
        plain["data"]["shards"] = shards
        plain["run"]["name"] = run_name
        plain["train"]["init_from"] = init_from or plain["train"]["init_from"]
        plain["tracking"]["tracking_uri"] = tracking_uri
        return TrainJobConfig.model_validate(plain)


def _is_vae(kind: str) -> bool:
    return getattr(model_class_for_kind(kind), "has_kl", False)


def load_retrain_config(path: str | Path | None, overrides: list[str] = ()) -> RetrainConfig:
    if path is None:
        raise ConfigError("tokenmill retrain needs a config file (configs/retrain_vqvae.yaml on this machine, "
                          "configs/retrain_vqvae_cluster.yaml on a cluster)")
    return load_config(RetrainConfig, path, overrides)
