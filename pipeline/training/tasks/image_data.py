"""The data an image task reads: shard URLs per split, the manifest identity, and the streams
(Ray Datasets under Ray Train, `LocalStream`s in this process).

Resolved on the driver before Ray work starts, so a missing manifest, a split without shards
or a missing shard fails the job at once with the URL in the message.
A built-in source (`builtin:mnist5k`) is sharded once into `<run.root>/shards/<name>`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.pipeline.shards.local_stream import LocalStream
from tokenmill.pipeline.shards.manifest import manifest_identity, read_manifest, shards_for_split
from tokenmill.pipeline.shards.sources import BUILTIN_SOURCES
from tokenmill.pipeline.shards.stream import EPOCH_CLOCK, ShardStream, StreamConfig, check_shards, open_stream

# Ray Train turns every column into a tensor: keep the numeric ones.
TRAIN_COLUMNS = ["image", "label"]


@dataclass
class TrainingData:
    shards_url: str
    train_urls: list[str]
    val_urls: list[str]
    manifest_identity: str  # pipeline.shards.manifest.manifest_identity
    config: Any  # the job's DataSection
    seed: int

    def stream_configs(self) -> dict[str, StreamConfig]:
        """The train stream is shuffled and augmented anew in every epoch (the loop sets the epoch);
        the val stream keeps a fixed order, without augmentation."""
        train = StreamConfig(transform=self.config.transform, shuffle_buffer=self.config.shuffle_buffer, seed=self.seed)
        val = StreamConfig(transform=self.config.transform.for_eval(), shuffle=False, shuffle_buffer=0)
        return {"train": train, "val": val}

    def open_streams(self) -> dict[str, ShardStream]:
        """Ray Data streams of both splits; the train stream reads its epoch from its `epoch_clock`."""
        configs, options = self.stream_configs(), self.config.storage_options
        return {"train": open_stream(self.train_urls, configs["train"], epoch=EPOCH_CLOCK, storage_options=options),
                "val": open_stream(self.val_urls, configs["val"], storage_options=options)}

    def local_streams(self) -> dict[str, LocalStream]:
        """The same rows read in this process, without Ray (`pipeline.training.context.LocalContext`)."""
        configs, options = self.stream_configs(), self.config.storage_options
        return {"train": LocalStream(self.train_urls, configs["train"], options),
                "val": LocalStream(self.val_urls, configs["val"], options)}


def ingest_config(datasets: dict[str, Any]):
    """The Ray Train DataConfig for `datasets` ({"train", "val"}): the train stream is split
    equally between ranks (unequal batch counts would hang DDP); val is split too, but unequally
    (`equal=False` drops no row), so each val image is decoded and evaluated by exactly one rank
    and the sums are all-reduced (`image_validation.evaluate`); before, every rank decoded the whole
    split and kept 1/world of it.

    Ray Train replaces each dataset's execution options with its ingest defaults, which drops the
    `preserve_order` the stream set; so it is passed through per dataset. The mid-epoch resume
    skip needs it (the batches skipped must be the ones the restored steps consumed)."""
    import ray.train
    from ray.util.annotations import RayDeprecationWarning

    options = {}
    for name, dataset in datasets.items():
        with warnings.catch_warnings():  # Ray's own defaults pass its deprecated `exclude_resources`
            warnings.simplefilter("ignore", RayDeprecationWarning)
            options[name] = ray.train.DataConfig.default_ingest_options()
        options[name].preserve_order = dataset.context.execution_options.preserve_order
    return _make_ingest_config(datasets_to_split=["train", "val"], execution_options=options)


def _make_ingest_config(**kwargs):
    import ray.train

    class IngestConfig(ray.train.DataConfig):
        """DataConfig whose `val` split is unequal (no dropped rows); everything else is Ray's."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **rest):
            output = [{} for _ in range(world_size)]
            others = {name: ds for name, ds in datasets.items() if name != "val"}
            if others:
                for mine, theirs in zip(output, super().configure(others, world_size, worker_handles,
                                                                  worker_node_ids, **rest)):
                    mine.update(theirs)
            if "val" in datasets:
                val = datasets["val"].copy(datasets["val"])
                val.context.execution_options = self._resolve_execution_options("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                splits = val.streaming_split(world_size, equal=False, locality_hints=hints)
                for mine, split in zip(output, splits):
                    mine["val"] = split
            return output

    return IngestConfig(**kwargs)


def materialize_builtin(source: str, root: str | Path) -> str:
    """Shard a built-in source once under `root/shards/<name>` (a rerun finds it complete)."""
    from tokenmill.pipeline.shards.writer import write_shards

    dest = Path(root).resolve() / "shards" / source.split(":", 1)[1]
    write_shards(source, str(dest), progress=False)
    return str(dest)


def resolve_training_data(config) -> TrainingData:
    data = config.data
    url = data.shards
    if url in BUILTIN_SOURCES:
        url = materialize_builtin(url, config.run.root)
    train_urls = shards_for_split(url, data.train_split, data.storage_options)
    val_urls = shards_for_split(url, data.val_split, data.storage_options)
    check_shards(train_urls + val_urls, data.storage_options)
    identity = manifest_identity(read_manifest(url, data.storage_options))
    return TrainingData(url, train_urls, val_urls, identity, data, config.train.seed)
