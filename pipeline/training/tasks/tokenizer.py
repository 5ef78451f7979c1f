"""The tokenizer task: every model of the VAE and VQ families on the image stream
(`tokenmill train` without a `loss` section; with one, `tasks.adversarial` extends this).

Data: the driver resolves the shards (missing or empty ones stop the job) and opens one Ray Data
stream per split; Ray Train splits train equally between ranks and val without dropping rows
(`image_data.ingest_config`). Each step is the model's own loss (a VAE's with the KL weight of
`kl`'s schedule). Validation: IW-NLL/ELBO for the VAE family, PSNR/SSIM/usage for the VQ family
(`image_validation`); rank 0 shows image panels of the first validation batch and, for VQ
models, the codebook usage of the whole split. The exported model carries the eval transform,
so tokenization decodes images the way training did, and the fine-tuning lineage
(`train.init_from`, `train.freeze`: `tasks.finetune`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import nn

from tokenmill.models.freezing import freeze
from tokenmill.models.serialization import build_model, model_class_for_kind, save_model
from tokenmill.pipeline.shards.stream import to_model_input
from tokenmill.pipeline.training.optim import OptimConfig, Part
from tokenmill.pipeline.training.step import Loss
from tokenmill.pipeline.training.task import Inputs, Task
from tokenmill.pipeline.training.tasks import image_validation
from tokenmill.pipeline.training.tasks.finetune import LINEAGE_KEY, finetune_lineage, lineage_tags
from tokenmill.pipeline.training.tasks.image_data import (
    TRAIN_COLUMNS,
    TrainingData,
    ingest_config,
    resolve_training_data,
)


class TokenizerTask(Task):
    name = "tokenizer"
    example = "img"

    # -- driver ---------------------------------------------------------------------------------------
    def prepare(self, tracking_uri: str) -> dict[str, str]:
        self.lineage = finetune_lineage(self.config, tracking_uri)  # a wrong train.freeze name fails here
        self.data: TrainingData = resolve_training_data(self.config)  # missing / empty shards fail here
        return self.version_tags()

    def version_tags(self) -> dict[str, str]:
        return {"tokenmill.data_manifest_identity": self.data.manifest_identity, **lineage_tags(self.lineage)}

    def shared_data(self) -> dict[str, str]:
        return {"data.shards": self.config.data.shards}

    def inputs(self, in_process: bool) -> Inputs:
        if in_process:
            streams = self.data.local_streams()
            return Inputs(streams, streams=streams)
        streams = self.data.open_streams()
        datasets = {name: stream.dataset.select_columns(TRAIN_COLUMNS) for name, stream in streams.items()}
        return Inputs(datasets, {"train": streams["train"].epoch_clock}, ingest_config(datasets), streams)

    def summary(self, inputs: Inputs) -> dict[str, Any]:
        return {"skipped_samples": {name: stream.report() for name, stream in inputs.streams.items()}}

    # -- every rank -----------------------------------------------------------------------------------
    def build(self) -> dict[str, tuple[nn.Module, OptimConfig]]:
        model = build_model(self.config.model)
        freeze(model, self.config.train.freeze)  # before DDP and the EMA copy see it
        return {"model": (model, self.config.optim)}

    def setup(self, context: Any) -> None:
        super().setup(context)
        self.train, self.val = context.dataset("train"), context.dataset("val")
        has_kl = getattr(model_class_for_kind(self.config.model.kind), "has_kl", False)
        self.kl_weight = self.config.kl if has_kl else None  # step -> β, for models with a KL term
        self.first_val_batch: Any = None  # rank 0's panels show it
        self.code_counts: list[torch.Tensor] = []  # per level, (stages, K), whole split

    def batches(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        loop, rank = self.config.train, self.context.rank
        self.train.set_epoch(epoch)  # this pass's shard order, shuffle and augmentation
        batches = self.train.iter_torch_batches(
            batch_size=loop.batch_size, drop_last=True, device=str(self.context.device),
            local_shuffle_buffer_size=self.config.data.shuffle_buffer or None,
            local_shuffle_seed=loop.seed + 1000 * epoch + rank)
        for index, batch in enumerate(batches):
            if index >= start:  # resuming mid-epoch: skip what the restored steps consumed
                yield index, batch

    def losses(self, batch: Any, step: int, parts: Mapping[str, Part]) -> Iterator[Loss]:
        x, y = to_model_input(batch)  # x: (B, C, H, W) float in [0, 1]; y: (B,) int64
        extra = {"kl_weight": self.kl_weight(step)} if self.kl_weight else {}
        output = parts["model"].model(x, y, **extra)
        yield Loss("model", output.loss, metrics={**output.metrics, **extra})

    def validate(self, model: nn.Module, precision: str) -> dict[str, float]:
        batches = self.val.iter_torch_batches(batch_size=self.config.train.batch_size, device=str(self.context.device))
        self.first_val_batch = None
        metrics, self.code_counts = image_validation.evaluate(
            model, self._keep_first(batches), self.config.train.iw_samples, self.context.rank, self.context.world_size,
            precision)
        return metrics

    def _keep_first(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Rank 0's panels come from its first val batch: a second pass over a split stream by
        rank 0 alone would wait for the other ranks."""
        for batch in batches:
            if self.first_val_batch is None:
                self.first_val_batch = batch
            yield batch

    def log_extras(self, model: nn.Module, step: int, logger: Any) -> None:
        if self.config.tracking.log_images and self.first_val_batch is not None:
            x, y = to_model_input(self.first_val_batch)
            for folder, grid in image_validation.image_panels(model, x[:16], y[:16]):  # x: (≤16, C, H, W)
                logger.log_image(grid, f"{folder}/step_{step:07d}.png")
        for level, counts in enumerate(self.code_counts):  # whole-split counts, (stages, K) per level
            histogram = image_validation.usage_histogram(counts.sum(0).cpu())
            logger.log_image(histogram, f"codebook_usage/level{level}_step_{step:07d}.png")

    def save(self, model: nn.Module, directory: Any) -> None:
        transform = self.config.data.transform.for_eval().model_dump(mode="json")
        lineage = getattr(self, "lineage", {})  # set by prepare (a task built without it: none)
        save_model(model, directory, extra={"transform": transform, **({LINEAGE_KEY: lineage} if lineage else {})})
