"""Connect to Ray: the cluster at RAY_ADDRESS when set, else a local instance."""

from __future__ import annotations

import logging
import os

from tokenmill.pipeline.runtime import console


def ensure_ray() -> None:
    import ray

    console.configure()  # after `import ray`, which sets the level of the "ray" logger
    if ray.is_initialized():
        return
    if not console.verbose():
        # With worker output off, what the driver still prints are the raylet's advisories
        # (e.g. "8 PYTHON worker processes have been started", expected on a small machine that
        # runs training workers, data tasks and actors); the raylet's own log keeps them, and failures
        # still reach the user as exceptions. Ray's debugger turns printing off the same way.
        ray._private.worker._worker_logs_enabled = False
    # Quiet: worker output stays in Ray's log files; the driver's "ray" logger shows warnings.
    quiet = dict(log_to_driver=console.log_to_driver(),
                 logging_level=logging.INFO if console.verbose() else logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
        return
    # Local: over-subscribe logical CPUs so two training workers and the data tasks fit on a
    # small machine (the workers spend much of their time waiting on each other and on data).
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, **quiet)


def quiet_ray_data_logs() -> None:
    """In this process, Ray Data logs warnings only: our jobs print their own progress, and Ray
    Data's per-execution INFO lines and its "progress bars disabled" notice would bury it."""
    if console.verbose():
        return
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
