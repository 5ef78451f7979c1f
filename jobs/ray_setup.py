"""Connect to Ray: the cluster at RAY_ADDRESS when set, else a local instance."""

from __future__ import annotations

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
