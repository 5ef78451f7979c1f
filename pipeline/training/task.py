"""What a model family gives the training engine: a `Task`.

The engine (`pipeline.training.driver` on the driver, `pipeline.training.loop` on every rank)
owns everything that is the same for every model: checks, MLflow, Ray Train, steps and epochs,
resume, accumulation, precision, clipping, skip-on-NaN, EMA, cadences, checkpoints, export.
A task owns what differs, and nothing else (`pipeline/training/tasks/`: tokenizer, adversarial,
prior). A new model family is a new task, never a new loop.

The driver makes the task from the job's config, calls its driver-side methods, and ships it to
every rank (it is pickled: driver-side results the ranks need, e.g. resolved shard URLs, live on
it; the streams and Ray handles go through `Inputs`). Each rank then calls `setup`, `build` and the rest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

from torch import nn

from tokenmill.pipeline.training.optim import OptimConfig, Part
from tokenmill.pipeline.training.step import Loss


@dataclasses.dataclass
class Inputs:
    """What the driver hands the ranks besides the task: datasets (Ray Datasets that Ray Train
    splits between ranks; in an in-process run, LocalStreams), the EpochClock of each Ray
    Dataset, Ray Train's ingest DataConfig, and the streams whose `report()` the summary shows."""

    datasets: dict[str, Any] = dataclasses.field(default_factory=dict)
    epoch_clocks: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_config: Any = None  # a ray.train.DataConfig, or None for Ray's default
    streams: dict[str, Any] = dataclasses.field(default_factory=dict)


class Task:
    """A model family; subclasses override the methods marked "abstract"."""

    name: ClassVar[str]  # "tokenizer", "adversarial", "prior": the MLflow tag `tokenmill.task`
    command: ClassVar[str] = "train"  # the command that trains it: the progress bar's label
    example: ClassVar[str] = "img"  # one training example, in throughput metrics: "<example>_per_s"

    def __init__(self, config: Any):
        self.config = config  # a pipeline.training.config.JobConfig subclass

    # -- driver side, before Ray starts -----------------------------------------------------------
    def prepare(self, tracking_uri: str) -> dict[str, str]:
        """Check every input (one UserError on a problem) and resolve what the ranks need;
        returns tags for the MLflow run."""
        return {}

    def shared_data(self) -> dict[str, str]:
        """config key -> URL of the data every node reads (refused when node-local on a cluster)."""
        return {}

    def announce(self) -> None:
        """Once every check passed: one line per input `prepare` found for the user (the prior
        task: where the store's tokenizer was found)."""

    def inputs(self, in_process: bool) -> Inputs:
        """The data the ranks read: Ray Datasets for Ray Train (after `ray` is connected), or
        streams read in this process (`scaling.in_process`)."""
        return Inputs()

    def export_extras(self, model_dir: Path) -> None:
        """Files that go with the exported model besides config.json and weights (lineage)."""

    def version_tags(self) -> dict[str, str]:
        """Tags of the registered model version (what the model was trained on)."""
        return {}

    def summary(self, inputs: Inputs) -> dict[str, Any]:
        """The task's own entries in the job's summary."""
        return {}

    # -- every rank ---------------------------------------------------------------------------------
    def build(self) -> dict[str, tuple[nn.Module, OptimConfig]]:
        """abstract: the trained modules (on the CPU, freshly initialised) and their optimizer
        configs; the first is the model that is validated, checkpointed and exported."""
        raise NotImplementedError

    def setup(self, context: Any) -> None:
        """Open this rank's data and helpers (a RankContext gives rank, world size, device, datasets)."""
        self.context = context

    def batches(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        """abstract: (index, micro-batch) of this rank's share of epoch `epoch`, from index `start`
        (what a resumed run has not consumed yet); every rank yields as many."""
        raise NotImplementedError

    def losses(self, batch: Any, step: int, parts: Mapping[str, Part]) -> Iterator[Loss]:
        """abstract: the step's losses, one per part, in order (`pipeline.training.step`): the code
        up to each yield runs under autocast, the loop runs the backward in between."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> dict[str, float]:
        """abstract: "val/..." metrics of `model` over the validation split (every rank its share,
        sums all-reduced, so every rank returns the same numbers)."""
        raise NotImplementedError

    def log_extras(self, model: nn.Module, step: int, logger: Any) -> None:
        """Rank 0: images for MLflow (reconstructions, samples, codebook usage) at step `step`."""

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the exportable `model` (config.json + model.safetensors) into `directory`."""
        from tokenmill.models.serialization import save_model

        save_model(model, directory)

    def rate_metrics(self, examples_per_s: float) -> dict[str, float]:
        return {f"{self.example}_per_s": examples_per_s}

    def state_dict(self) -> dict[str, Any]:
        """Task state outside the parts that a resume must restore (e.g. LeCAM averages)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
