"""Refuse node-local storage on a multi-node Ray cluster, before any work starts.

On one machine, local paths, `builtin:` sources (sharded under `run.root` on the driver) and a
SQLite MLflow file are fine. On a cluster, training workers and data tasks run on other nodes:
they would read shards that are not there, write checkpoints another node never sees, and log
to another SQLite file. Every such setting gets one message naming the key and the fix, unless
the config says its local paths are on a filesystem every node mounts (`run.shared_storage`).
The training engine's driver calls `check_cluster_storage` for every task; any job that runs on
Ray workers can do the same.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import fsspec

from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry.tracking import default_tracking_uri

LOCAL_PROTOCOLS = {"file", "local"}
LOCAL_TRACKING_SCHEMES = {"", "file", "sqlite"}


def cluster_nodes() -> int:
    """How many nodes work may land on. Without RAY_ADDRESS and without a connected Ray the job
    starts a local, single-node Ray. A node offering no CPU to the driver's cluster (a KubeRay
    head with num-cpus 0, its workers autoscaled in later) counts as a cluster too: work lands elsewhere."""
    import ray

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        return 1
    ensure_ray()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    if len(alive) == 1 and not alive[0].get("Resources", {}).get("CPU"):
        return 2
    return len(alive)


def is_local_url(url: str) -> bool:
    """A path on this machine's disk: no protocol, or file:// / local://."""
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol is None or protocol in LOCAL_PROTOCOLS


def local_storage_problems(config, data: dict[str, str]) -> list[str]:
    """One line per setting of a training config that only this node can see: the task's data
    (`data`: config key -> URL, e.g. {"data.shards": ...}), checkpoints and the tracking store."""
    shared = "or set run.shared_storage=true if every node mounts it at the same path"
    problems = []
    for key, url in data.items():
        if url.startswith("builtin:"):
            problems.append(f"{key}={url} is sharded onto this node's disk; write it to shared storage "
                            f"(`tokenmill shard {url} s3://BUCKET/shards/NAME`) and set {key} to that URL, {shared}")
        elif is_local_url(url):
            problems.append(f"{key}={url} is a local path; copy it to s3:// (or another URL every node reads) "
                            f"and set {key}, {shared}")
    checkpoints = config.run.resolved_storage_path()
    if is_local_url(checkpoints):
        problems.append(f"run.storage_path={checkpoints} (Ray Train checkpoints) is a local path; set it to an "
                        f"s3:// URL, {shared}")
    tracking = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking is None or urlparse(tracking).scheme in LOCAL_TRACKING_SCHEMES and tracking != "databricks":
        tracking = tracking or f"{default_tracking_uri(config.run.root)} (the default)"
        problems.append(f"tracking.tracking_uri={tracking} is a file on this node, but rank 0 logs from another; "
                        f"set MLFLOW_TRACKING_URI (or tracking.tracking_uri) to an MLflow server, {shared}")
    return problems


def check_cluster_storage(config, data: dict[str, str], nodes: int | None = None) -> None:
    """UserError listing every node-local setting of `config` (and of its `data`, see
    `local_storage_problems`) when it would run on more than one node (`nodes`, default: counted
    on the Ray cluster this job uses)."""
    if config.run.shared_storage or config.scaling.in_process:  # in process: nothing runs on other nodes
        return
    problems = local_storage_problems(config, data)
    if not problems:
        return
    nodes = cluster_nodes() if nodes is None else nodes
    if nodes > 1:
        raise UserError(f"this Ray cluster has {nodes} nodes and other nodes cannot see local storage: "
                        + "; ".join(problems))


def check_local_gpus(scaling) -> None:
    """`scaling.use_gpu` on this machine (in process, or on a Ray that this job starts here: no
    RAY_ADDRESS, none connected) needs the GPUs here: nothing will add a GPU node, and Ray Train
    would wait for one forever. Checked before Ray starts, from torch's view of this machine."""
    import ray
    import torch

    remote = os.environ.get("RAY_ADDRESS") or ray.is_initialized()
    if not scaling.use_gpu or (remote and not scaling.in_process):
        return
    have, need = torch.cuda.device_count(), 1 if scaling.in_process else scaling.num_workers
    if have < need:
        fix = "" if scaling.in_process else ", or set RAY_ADDRESS to a cluster with GPUs"
        raise UserError(f"scaling.use_gpu=true asks for {need} GPU worker(s), but this machine has {have} GPU(s)"
                        f"{'' if scaling.in_process else ' and a local Ray adds none'}; set scaling.use_gpu=false "
                        f"(--set scaling.use_gpu=false){fix}")
