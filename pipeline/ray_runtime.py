"""Connect to Ray: the cluster at RAY_ADDRESS when set, else a local instance."""

from __future__ import annotations

import logging
import os


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # Local: over-subscribe logical CPUs so two training workers and the data tasks fit on a
    # small machine (the workers spend much of their time waiting on each other and on data).
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)


def quiet_ray_data_logs() -> None:
    """In this process, Ray Data logs warnings only: our jobs print their own progress, and Ray
    Data's per-execution INFO lines and its "progress bars disabled" notice would bury it."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
