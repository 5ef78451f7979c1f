"""Champion and challenger scores, computed on Ray workers with the training's resources.

The fixed validation shards are dealt to at most `scaling.num_workers` Ray tasks, each with the
training's resources (`scaling.cpus_per_worker` CPUs, and one GPU when `scaling.use_gpu`), so the
driver (a cluster's small head) neither loads a model nor decodes an image. A task loads the model
from its reference (registry or path) itself and returns, per shard, the sums of training's
validation pass (`image_validation.accumulate`), plus LPIPS sums or Inception features when the
deciding metric needs them. The driver adds the shards' sums in shard order: the same fold the
in-process `score_in_process` makes, so the scores equal one process's bit for bit, whatever the
split. VAE IW samples are seeded per shard (`validation.seed` + shard index), so a shard draws the
same wherever it is scored. prior_bits (a tokenization and a small prior, one process) is one more
task beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry.config import RetrainConfig
from tokenmill.pipeline.training.tasks.image_validation import ValidationSums


@dataclass
class ShardScore:
    """One validation shard's share of the scores (CPU tensors: it travels back from a task)."""

    index: int  # the shard's position in the split: the order shares are added in
    sums: ValidationSums
    lpips: tuple[float, int] | None = None  # (LPIPS sum, images): metric lpips
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # (n, 2048) originals, recons: metric rfid


def deal(urls: list[str], tasks: int) -> list[list[tuple[int, str]]]:
    """(index, url) of the shards dealt round-robin to at most `tasks` non-empty shares."""
    tasks = max(1, min(tasks, len(urls)))
    return [[(i, url) for i, url in enumerate(urls) if i % tasks == share] for share in range(tasks)]


def score_shards(model_ref: str, tracking_uri: str, config: RetrainConfig,
                 shards: list[tuple[int, str]]) -> list[ShardScore]:
    """The shares of `shards` ((index, url)) of model `model_ref`, on a GPU when the training used one."""
    from tokenmill.pipeline.registry import downstream
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.training.tasks import image_validation

    device = "cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    model = resolve_model(model_ref, tracking_uri, config.data.storage_options).load(device)[0].eval()
    lpips = downstream.lpips_model(config, device) if config.metric_name == "lpips" else None
    inception = downstream.inception_model(config, device) if config.metric_name == "rfid" else None
    parts = []
    for index, url in shards:
        torch.manual_seed(config.validation.seed + index)  # the IW samples of VAEs: same draws for every model
        sums = image_validation.accumulate(model, shard_batches(url, config), config.validation.iw_samples).cpu()
        part = ShardScore(index, sums)
        if lpips is not None:
            part.lpips = downstream.lpips_sums(model, shard_batches(url, config), lpips)
        if inception is not None:
            part.features = downstream.inception_features(model, shard_batches(url, config), inception)
        parts.append(part)
    return parts


def merge(parts: list[ShardScore], config: RetrainConfig) -> dict[str, float]:
    """The scores of the whole split from its shards' shares, added in shard order."""
    from tokenmill.pipeline.registry import downstream

    parts = sorted(parts, key=lambda part: part.index)
    sums = reduce(lambda a, b: a + b, (part.sums for part in parts))
    if not sums.images:
        section = config.validation
        raise UserError(f"validation.shards {section.shards} has no readable {section.split} images")
    metrics, _ = sums.result()
    if config.metric_name == "lpips":
        metrics[config.metric] = sum(p.lpips[0] for p in parts) / max(sum(p.lpips[1] for p in parts), 1)
    if config.metric_name == "rfid":
        originals, recons = (torch.cat([p.features[side] for p in parts]) for side in (0, 1))
        metrics[config.metric] = downstream.rfid(originals, recons)
    return metrics


def score_in_process(model_ref: str, tracking_uri: str, config: RetrainConfig) -> dict[str, float]:
    """Every metric of model `model_ref` on the fixed shards, in this process (no Ray)."""
    metrics = merge(score_shards(model_ref, tracking_uri, config, deal(_shard_urls(config), 1)[0]),
                    config)
    if config.metric_name == "prior_bits":
        metrics[config.metric] = prior_bits(model_ref, tracking_uri, config)[0]
    return metrics


def score_on_workers(model_ref: str, tracking_uri: str,
                     config: RetrainConfig) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`score_in_process`'s metrics, computed by Ray tasks with the training's resources; and
    where each task ran ({"node", "pid", "gpus", "shards"}; prior_bits' with "metric")."""
    import ray

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray

    ensure_ray()
    scaling = config.scaling
    # Ray retries a task whose worker or node died (scoring is deterministic); an exception is not retried.
    resources = {"num_cpus": scaling.cpus_per_worker, "num_gpus": 1 if scaling.use_gpu else 0}
    shares = deal(_shard_urls(config), scaling.num_workers)
    pending = [ray.remote(**resources)(_shards_task).remote(model_ref, tracking_uri, config, share)
               for share in shares]
    if config.metric_name == "prior_bits":
        pending.append(ray.remote(**resources)(prior_bits).remote(model_ref, tracking_uri, config))
    done = _gather(pending)
    metrics = merge([part for parts, _ in done[:len(shares)] for part in parts], config)
    placement = [{**where, "shards": [i for i, _ in share]} for (_, where), share in zip(done, shares)]
    if config.metric_name == "prior_bits":
        metrics[config.metric], where = done[-1]
        placement.append({**where, "metric": config.metric})
    return metrics, placement


def _gather(pending: list) -> list:
    """The tasks' results; a user mistake inside one stays a one-line UserError (Ray wraps it)."""
    import ray

    try:
        return ray.get(pending)
    except ray.exceptions.RayTaskError as err:
        for task in pending:
            ray.cancel(task)
        if isinstance(err.cause, UserError):
            raise UserError(str(err.cause)) from None
        raise


def _shard_urls(config: RetrainConfig) -> list[str]:
    """The fixed split's shard URLs, each checked (UserError naming a missing one) before any task starts."""
    from tokenmill.pipeline.registry import promotion
    from tokenmill.pipeline.shards.stream import check_shards

    urls = promotion.validation_shard_urls(config)
    check_shards(urls, config.data.storage_options)
    return urls


def shard_batches(url: str, config: RetrainConfig):
    """One validation shard's batches, decoded as training decodes validation data (bad samples
    are skipped alike for both models)."""
    from tokenmill.pipeline.shards.stream import StreamConfig, iter_shard_batches

    stream = StreamConfig(transform=config.data.transform.for_eval(), shuffle=False, shuffle_buffer=0,
                          batch_rows=config.validation.batch_size)
    return (batch for batch in iter_shard_batches(url, stream, [], storage_options=config.data.storage_options)
            if len(batch["key"]))


def prior_bits(model_ref: str, tracking_uri: str, config: RetrainConfig) -> tuple[float, dict[str, Any]]:
    """The downstream prior_bits of model `model_ref` (`pipeline.registry.downstream`), and where it ran."""
    from tokenmill.pipeline.registry import downstream, promotion
    from tokenmill.pipeline.registry.model_ref import resolve_model

    files = resolve_model(model_ref, tracking_uri, config.data.storage_options)
    return downstream.prior_bits(files, config, promotion.validation_folder(config), tracking_uri), _where()


def _shards_task(model_ref: str, tracking_uri: str, config: RetrainConfig,
                 shards: list[tuple[int, str]]) -> tuple[list[ShardScore], dict[str, Any]]:
    return score_shards(model_ref, tracking_uri, config, shards), _where()


def _where() -> dict[str, Any]:
    """The process a score was computed in: its Ray node, pid and GPUs (none outside Ray)."""
    import ray

    if not ray.is_initialized():
        return {"node": None, "pid": os.getpid(), "gpus": []}
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}
