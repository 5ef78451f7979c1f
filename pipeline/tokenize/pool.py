"""How many tokenize actors, on what, with how many decode threads: decided from the cluster.

The driver of a KubeRay job usually runs on a CPU head, so `torch.cuda.is_available()` there
says nothing about the workers. `plan_pool` decides from what the cluster reports
(`ray.cluster_resources()`) and the user's `--gpus` / `--actors`, and gives Ray Data an
autoscaling actor pool (`ActorPoolStrategy(min_size, max_size, initial_size)`): it starts with
the actors that fit now and grows, as the cluster autoscaler adds nodes, up to `max_size`.

A cluster scaled to zero reports no GPU (and few CPUs) until work asks for them, so there
`--gpus N` says "GPU actors, up to N" and `--actors N` "up to N actors"; the actors' resource
requests are what makes the autoscaler add nodes. A pure function of its inputs, so the
decision is tested without a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

SCALED_TO_ZERO_DECODE_THREADS = 4  # per GPU actor while no GPU node is up to say how many CPUs it has


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool of one tokenize run."""

    min_size: int
    max_size: int
    initial_size: int
    num_gpus: int  # per actor: 0 or 1
    num_cpus: int  # per actor: the CPUs Ray reserves for it = its decode (and, on CPU, torch) threads
    decode_threads: int

    def strategy_kwargs(self) -> dict[str, int]:
        """Keyword arguments of `ray.data.ActorPoolStrategy`. One work unit in flight per actor:
        a unit is seconds to minutes of work, so a queue per actor only makes a tail (the last
        actors finishing their queued units while the others idle)."""
        sizes = {"size": self.max_size} if self.min_size == self.max_size else {
            "min_size": self.min_size, "max_size": self.max_size, "initial_size": self.initial_size}
        return {**sizes, "max_tasks_in_flight_per_actor": 1}


def cpus_per_gpu(nodes: list[Mapping[str, float]]) -> int | None:
    """The fewest CPUs per GPU of the GPU nodes among `nodes` (each node's resources, as
    `ray.nodes()[i]["Resources"]`), so an actor of that many CPUs fits on every one; None when
    no GPU node is up."""
    ratios = [int(n.get("CPU", 0)) // int(n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1]
    return max(1, min(ratios)) if ratios else None


def plan_pool(resources: Mapping[str, float], pending_shards: int, *, gpus: int | None = None,
              actors: int | None = None, decode_threads: int | None = None, local_cores: int | None = None,
              nodes: list[Mapping[str, float]] | None = None) -> PoolPlan:
    """The pool for `pending_shards` work units on a cluster with `resources` (cluster totals,
    as `ray.cluster_resources()`). `gpus`: None decides from the cluster, 0 forces CPU actors,
    N > 0 GPU actors up to N (also when the cluster shows none yet: scaled to zero). `actors`
    caps the pool (and on a CPU cluster scaled to zero sets how far it may grow). `local_cores`:
    the cores of this machine when Ray is the local instance, whose logical CPUs over-subscribe
    them (one actor per logical CPU there is ~30% slower); None on a real cluster. `nodes`: each
    node's resources; a GPU actor's decode threads are its node's CPUs per GPU (`cpus_per_gpu`)."""
    cluster_gpus = int(resources.get("GPU", 0))
    cluster_cpus = max(1, int(resources.get("CPU", 1)))
    use_gpu = cluster_gpus > 0 if gpus is None else gpus > 0
    work = max(1, pending_shards)
    if use_gpu:
        # Decode threads feed the device: all of the node's CPUs per GPU (a GPU encodes faster than
        # a few cores decode); without a GPU node to ask, the cluster's ratio, at most the default.
        threads = decode_threads or cpus_per_gpu(nodes or []) or max(
            1, min(SCALED_TO_ZERO_DECODE_THREADS, cluster_cpus // max(1, cluster_gpus)))
        ceiling = gpus if gpus else cluster_gpus
        fit_now = cluster_gpus
        num_cpus = threads
    else:
        threads = decode_threads or 1
        cores = min(cluster_cpus, local_cores) if local_cores else cluster_cpus
        ceiling = max(1, cores // threads)
        fit_now = ceiling
        num_cpus = threads
    if actors is not None:
        ceiling = actors
    max_size = max(1, min(ceiling, work))
    initial = max(1, min(fit_now, max_size))
    # Local instance: nothing will be added, so the pool is fixed at what fits.
    min_size = max_size if local_cores else 1
    return PoolPlan(min_size=min(min_size, max_size), max_size=max_size, initial_size=max(initial, min(min_size, max_size)),
                    num_gpus=1 if use_gpu else 0, num_cpus=num_cpus, decode_threads=threads)


def local_cores() -> int | None:
    """This machine's usable cores when Ray is the local instance (no RAY_ADDRESS), else None."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
