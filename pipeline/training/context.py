"""Where a rank runs: its place in the world, its device, its data shards, its checkpoints.

The loop (`pipeline.training.loop`) talks to a `RankContext` only, never to Ray Train directly,
so it runs two ways:
  * `RayTrainContext`: inside a Ray Train worker (DDP, Ray Data shards, Ray Train checkpoints
    and `ray.train.report`, which every rank calls the same number of times);
  * `LocalContext`: in this process, world size 1, checkpoints in a local folder: unit tests run
    the whole loop of every task without Ray.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

METRICS_FILE = "metrics.json"


class RankContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare(self, module: nn.Module) -> nn.Module:
        """`module` on this rank's device, DDP-wrapped when the world has more than one rank."""

    def dataset(self, name: str) -> Any:
        """This rank's share of the driver's dataset `name`: `set_epoch(e)`, `iter_torch_batches(...)`."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the latest checkpoint to resume from, or None for a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        """Report `metrics` (every rank, at the same steps); rank 0 attaches `checkpoint`."""


class RayTrainContext:
    def __init__(self, epoch_clocks: dict[str, Any], scaling: Any):
        """`epoch_clocks`: dataset name -> the driver's EpochClock; `scaling`: the job's section."""
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.epoch_clocks = epoch_clocks
        if not scaling.use_gpu:
            # Ray sets OMP_NUM_THREADS only when the environment has none; match the worker's CPUs.
            torch.set_num_threads(max(1, int(scaling.cpus_per_worker)))

    def prepare(self, module: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # moved to the device; DDP when world_size > 1

    def dataset(self, name: str) -> Any:
        import ray.train

        return _ClockedShard(ray.train.get_dataset_shard(name), self.epoch_clocks.get(name))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        attached = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=attached)


class _ClockedShard:
    """A Ray Train dataset shard whose passes read their epoch from the driver's EpochClock
    (`pipeline.shards.stream`): every rank sets it before a pass, Ray starts the pass once all asked."""

    def __init__(self, shard: Any, clock: Any):
        self.shard, self.clock = shard, clock

    def set_epoch(self, epoch: int) -> None:
        if self.clock is not None:
            import ray

            ray.get(self.clock.set.remote(epoch))

    def iter_torch_batches(self, **options: Any) -> Iterator[dict[str, torch.Tensor]]:
        return self.shard.iter_torch_batches(**options)


class LocalContext:
    """Rank 0 of 1 in this process. `datasets`: name -> an object with `set_epoch` and
    `iter_torch_batches` (`pipeline.shards.local_stream.LocalStream`); checkpoints are folders
    `checkpoint_step_<step>` under `folder` (the newest `keep` are kept), each with the metrics reported
    with it (`metrics.json`); `reports` lists this process's reports."""

    rank, world_size = 0, 1

    def __init__(self, folder: str | Path, datasets: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu", keep: int = 2):
        self.folder, self.datasets, self.keep = Path(folder), datasets or {}, keep
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def dataset(self, name: str) -> Any:
        return self.datasets.get(name)  # None: a rank that trains from elsewhere (a benchmark's tensors)

    def checkpoints(self) -> list[Path]:
        return sorted(self.folder.glob("checkpoint_step_*"))  # not Ray Train's checkpoint_<time> folders

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is None:
            return
        destination = self.folder / f"checkpoint_step_{metrics['step']:07d}"
        shutil.rmtree(destination, ignore_errors=True)
        shutil.copytree(checkpoint, destination)
        (destination / METRICS_FILE).write_text(json.dumps(metrics, sort_keys=True))
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old)

    @staticmethod
    def metrics(checkpoint: Path) -> dict[str, Any]:
        """The metrics reported with `checkpoint` (a rerun of a finished run reports nothing new)."""
        return json.loads((checkpoint / METRICS_FILE).read_text())
