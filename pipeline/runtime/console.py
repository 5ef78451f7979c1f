"""What a tokenmill command prints: our progress lines and summary, not Ray's or MLflow's chatter.

Quiet (the default): Ray does not forward worker output to the driver (rank 0 sends training
progress to the driver itself, `pipeline.training.progress`), and the Ray, MLflow, alembic and
urllib3 loggers of this process show warnings and errors only. Ray's log files
(/tmp/ray/session_latest/logs) still hold every worker's full output. `tokenmill --verbose` or
TOKENMILL_VERBOSE=1 shows everything, as Ray and MLflow print it by default.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "TOKENMILL_VERBOSE"

# Read by MLflow when it is imported (here and in Ray workers, which inherit the environment of
# the process that starts local Ray); a value the user set wins.
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables", system metrics notices
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars on every model read
}

# Loggers of this process and the level they show when quiet.
QUIET_LOGGERS = {
    "ray": logging.WARNING,  # "Started a local Ray instance", Ray Train's driver-side INFO lines
    "ray.data": logging.WARNING,  # per-execution plans and "execution finished" lines
    "ray.data._internal.progress": logging.ERROR,  # "progress bars disabled" notice
    # A notice that the local instance uses token authentication, not a problem.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "mlflow": logging.WARNING,
    "alembic": logging.WARNING,
    "urllib3": logging.WARNING,
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """`--verbose`: recorded in the environment, so Ray workers started later see it too."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def configure() -> None:
    """Apply the console policy to this process; idempotent, cheap, and a no-op when verbose."""
    if verbose():
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(max(level, logger.getEffectiveLevel()))  # never louder than the user made it


def log_to_driver() -> bool:
    """Whether Ray forwards worker stdout/stderr to this process (`ray.init(log_to_driver=...)`)."""
    return verbose()
