"""What rank 0 tells the user and MLflow during training.

Progress to the driver's bar (`pipeline.training.progress`; lines on stdout when there is no
board, which Ray forwards to the driver only with --verbose), metrics by step, system metrics
(CPU, memory, GPU), and images and files the task offers (`Task.log_extras`). Only rank 0
constructs this, so one process writes to MLflow. Without a tracking URI (in-process runs that
track nothing, e.g. benchmarks) metrics and images go nowhere and progress still shows.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.pipeline.training.progress import post


def say(line: str) -> None:
    """One progress line to the driver. Ray Train's patched `print` writes a line twice (to its
    logger and to the wrapped stream) once MLflow wraps sys.stdout; the original stream is not
    wrapped, so lines written there arrive once."""
    print(line, file=sys.__stdout__, flush=True)


def to_hwc_uint8(grid: torch.Tensor) -> np.ndarray:
    """(C, H, W) floats in [0, 1] -> (H, W, 3) uint8 for mlflow.log_image."""
    pixels = (grid.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


class RankZeroLogger:
    def __init__(self, tracking_uri: str | None, run_id: str | None, total_steps: int, board: Any = None):
        self.mlflow = None
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: `finish` puts the process's
        # own setting back (an in-process run must not send the rest of the process to this store).
        self._uri_before = os.environ.get("MLFLOW_TRACKING_URI")
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            # Reattach to the driver's run; system metrics are sampled from here.
            mlflow.start_run(run_id=run_id, log_system_metrics=True)
            self.mlflow = mlflow
        self.total_steps = total_steps
        self.board = board  # the driver's ProgressBoard (an actor, or in this process), or None
        self._first_log: tuple[int, float] | None = None  # (step, time) of this attempt's first log

    def log_step(self, step: int, metrics: dict[str, float], postfix: str) -> None:
        """Training metrics (logged as train/<name>) and `postfix` for the progress bar."""
        self._log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
        if self.board is not None:
            post(self.board, ("step", step, postfix))
            return
        now = time.time()
        first_step, first_time = self._first_log = self._first_log or (step, now)
        seconds_per_step = (now - first_time) / (step - first_step) if step > first_step else float("nan")
        eta = f"{seconds_per_step * (self.total_steps - step):.0f}s" if step > first_step else "?"
        say(f"step {step}/{self.total_steps}  {postfix}  ETA {eta}")

    def log_validation(self, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics(metrics, step)
        self.say(step, f"step {step}/{self.total_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def log_image(self, image: torch.Tensor | np.ndarray, name: str) -> None:
        """`image`: a (C, H, W) grid in [0, 1] or an (H, W, 3) uint8 array; `name` e.g. "samples/step_0000100.png"."""
        if self.mlflow is not None:
            pixels = to_hwc_uint8(image) if torch.is_tensor(image) else image
            self.mlflow.log_image(pixels, artifact_file=name)

    def log_file(self, path: Path, folder: str) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def say(self, step: int, line: str) -> None:
        """A progress line above the driver's bar (or on stdout without a board)."""
        if self.board is not None:
            post(self.board, ("line", step, line))
        else:
            say(line)

    def finish(self, status: str = "FINISHED") -> None:
        """Ends this rank's hold on the run (`status` FINISHED or FAILED) and restores the URI."""
        if self.mlflow is not None:
            self.mlflow.end_run(status)
            self.mlflow.set_tracking_uri(self._uri_before)  # None: unset again

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=step)
