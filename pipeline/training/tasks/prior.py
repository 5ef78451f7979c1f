"""The prior task: a Transformer over a token store's codes (`tokenmill train-prior`).

Driver: everything about the input is checked before Ray starts, each problem one UserError (no
store, an unfinished or latent store, a missing split, a model section that disagrees with the
store, a tokenizer that cannot be read, whose weights differ from the store's lineage or whose
codes do not fit). The ranks then open the store themselves, with no Ray Datasets: every rank
reads its own slice of each global batch (`pipeline.prior.data`). The model section's `kind` picks
the prior (`pipeline.prior.config.prior_config`): `prior` (autoregressive), `maskgit` or `var`
(next-scale, on a multi-scale store); all take the same `[BOS, (class), codes]` rows. A step is
the model's loss: next-token or next-scale (nats per code token) or, for MaskGIT, masked-token
(nats per masked code; eval mode masks with a fixed seed); label dropout for classifier-free
guidance in every kind. Validation: that loss in bits per token
over the validation split. Rank 0's images: sample grids, one row per class, decoded by the
store's tokenizer. The exported prior carries `lineage.json` (store, tokenizer, vocabulary, grid).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from torch import nn

from tokenmill.models.errors import UserError
from tokenmill.models.prior import PriorConfig
from tokenmill.models.serialization import build_model
from tokenmill.pipeline.prior import data as prior_data
from tokenmill.pipeline.prior.config import prior_config
from tokenmill.pipeline.prior.validation import bits_per_token, sample_grid
from tokenmill.pipeline.runtime.redaction import redact
from tokenmill.pipeline.training.optim import OptimConfig, Part
from tokenmill.pipeline.training.step import Loss
from tokenmill.pipeline.training.task import Task

LN2 = math.log(2.0)


class PriorTask(Task):
    name = "prior"
    command = "train-prior"
    example = "seq"

    # -- driver ---------------------------------------------------------------------------------------
    def prepare(self, tracking_uri: str) -> dict[str, str]:
        data = self.config.data
        probe = prior_data.open_split(data, data.train_split, 0)
        fields = prior_data.resolve_model_fields(self.config.model, prior_data.store_vocab(probe))
        for split in (data.train_split, data.val_split):
            prior_data.open_split(data, split, fields["num_classes"])  # UserError: no such split
        try:
            prior = prior_config(fields)  # the kind's own checks (dim divisible by heads, VAR's scales)
        except ValueError as err:
            raise UserError(f"model: {err}") from None
        self.model_fields = fields
        # ModelFiles, sha256 checked; the store's lineage; where the tokenizer was found (`Resolved`)
        self.tokenizer, self.store_lineage, self.found = store_tokenizer(self.config, prior, tracking_uri)
        return {"tokenmill.token_store": redact(data.store), "tokenmill.tokenizer_sha256": self.tokenizer.weights_sha256}

    def shared_data(self) -> dict[str, str]:
        return {"data.store": self.config.data.store}

    def announce(self) -> None:
        self.found.announce()

    def export_extras(self, model_dir: Path) -> None:
        """lineage.json next to the prior's config.json: the store, its tokenizer and the vocabulary."""
        from tokenmill.pipeline.prior.lineage import prior_lineage, write_prior_lineage
        from tokenmill.pipeline.registry.resolver import absolute_location, merge_sources, source

        prior = prior_config(self.model_fields)
        # Where the store says the tokenizer is, and where this run found it (an older store records no source).
        found = merge_sources(self.store_lineage.get("model_source"), source(self.tokenizer))
        lineage = prior_lineage(absolute_location(self.config.data.store), self.store_lineage, prior.vocab(),
                                prior.grid, found)
        write_prior_lineage(model_dir, redact(lineage))

    def summary(self, inputs: Any) -> dict[str, Any]:
        return {"store": self.config.data.store, "tokenizer_uri": self.store_lineage["model_uri"],
                "tokenizer_found": self.found.where}

    # -- every rank -----------------------------------------------------------------------------------
    def build(self) -> dict[str, tuple[nn.Module, OptimConfig]]:
        return {"model": (build_model(prior_config(self.model_fields)), self.config.optim)}

    def setup(self, context: Any) -> None:
        super().setup(context)
        data, loop = self.config.data, self.config.train
        classes = self.model_fields["num_classes"]
        train = prior_data.open_split(data, data.train_split, classes)
        self.train = prior_data.TrainBatches(train, data.train_split, context.rank, context.world_size,
                                             loop.batch_size, loop.seed, data.shuffle_window_chunks,
                                             data.prefetch_batches)
        self.val = prior_data.open_split(data, data.val_split, classes)
        self.decoder = None  # rank 0, when it draws sample grids: the store's tokenizer
        if context.rank == 0 and loop.sample_every != 0:
            self.decoder = self.tokenizer.load()[0].eval()

    def batches(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        for index, batch in self.train.epoch(epoch, start):
            self._record_items(epoch, index, batch["indices"])
            yield index, batch["tokens"]  # (B, prefix + N) int64

    def losses(self, batch: Any, step: int, parts: Mapping[str, Part]) -> Iterator[Loss]:
        yield next_token_loss(batch.to(self.context.device, non_blocking=True), parts)

    def validate(self, model: nn.Module, precision: str) -> dict[str, float]:
        loop, data = self.config.train, self.config.data
        batches = prior_data.val_batches(self.val, self.context.rank, self.context.world_size, loop.batch_size,
                                         data.val_max_items)
        return {"val/bits_per_token": bits_per_token(model, batches, self.context.device, precision)}

    def log_extras(self, model: nn.Module, step: int, logger: Any) -> None:
        if self.decoder is None or not self.config.tracking.log_images:
            return
        with tempfile.TemporaryDirectory() as directory:
            path = sample_grid(model, self.decoder, self.config.sample, self.config.train.seed,
                               Path(directory) / f"step_{step:07d}.png")
            logger.log_file(path, "samples")

    def rate_metrics(self, examples_per_s: float) -> dict[str, float]:
        return {"seq_per_s": examples_per_s, "tokens_per_s": examples_per_s * prior_config(self.model_fields).seq_len}

    def _record_items(self, epoch: int, batch_index: int, indices: Any) -> None:
        """With `data.item_log` set, append what this rank reads ("epoch batch item...") to
        `<item_log>/rank<r>.txt`: an audit of which samples a run saw (tests check the partition)."""
        folder = self.config.data.item_log
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with open(Path(folder) / f"rank{self.context.rank}.txt", "a") as log:
                log.write(f"{epoch} {batch_index} {' '.join(map(str, indices.tolist()))}\n")


def next_token_loss(tokens: Any, parts: Mapping[str, Part]) -> Loss:
    """The prior's step loss on tokens (B, prefix + N): nats per code token (MaskGIT: per masked
    code; label dropout in train mode), through the wrapper's own forward (DDP's gradient hooks need it)."""
    loss = parts["model"].model(tokens, return_loss=True)
    return Loss("model", loss, metrics={"bits_per_token": loss.detach() / LN2})


def store_tokenizer(config: Any, prior: PriorConfig, tracking_uri: str | None) -> tuple[Any, dict[str, Any], Any]:
    """The `ModelFiles` of the tokenizer the store's lineage names (found as
    `pipeline.registry.resolver` says, `tracking_uri` the current registry), with the recorded
    weights sha256 and a code shape that fits `prior`; the store's lineage; the `Resolved` saying
    where it was found (announced by the driver once every check passed). UserError otherwise."""
    from tokenmill.pipeline.prior.sampling import check_tokenizer_fits
    from tokenmill.pipeline.registry.resolver import Recorded, resolve_recorded
    from tokenmill.pipeline.tokens.store import TokenStore

    data = config.data
    lineage = TokenStore(data.store, data.storage_options).token_attrs()["lineage"]
    hint = ("train-prior needs the store's own tokenizer (sample grids, lineage): point --set "
            "tracking.tracking_uri=… (or MLFLOW_TRACKING_URI) at the registry that holds it")
    # Not found anywhere with the recorded weights: one UserError naming the store, the attempts and the fix.
    found = resolve_recorded(Recorded.of_store(lineage), owner=data.store, fix=hint, tracking_uri=tracking_uri,
                             storage_options=data.storage_options)
    try:
        check_tokenizer_fits(found.files.load()[0], prior, found.where)
    except UserError as err:  # other code shapes
        raise UserError(f"the tokenizer of {data.store} is unusable: {err}") from None
    return found.files, lineage, found
