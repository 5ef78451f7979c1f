"""What rank 0 tells the user and MLflow during training.

Progress to the driver's bar (`pipeline.training.progress`; lines on stdout when there is no
board, which Ray forwards to the driver only with --verbose), metrics by step, system metrics,
and image artifacts: each model shows what it offers (`image_panels`): reconstructions, samples
at several temperatures, latent interpolations, and the codebook usage histogram (VQ family).
Only rank 0 constructs this, so one process writes to MLflow.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from models.latent_ops import has_latent_paths, interpolate, make_grid
from pipeline.shards.stream import to_model_input


def say(line: str) -> None:
    """One progress line to the driver. Ray Train's patched `print` writes a line twice (to its
    logger and to the wrapped stream) once MLflow wraps sys.stdout; the original stream is not
    wrapped, so lines written there arrive once."""
    print(line, file=sys.__stdout__, flush=True)


def _to_hwc_uint8(grid: torch.Tensor) -> np.ndarray:
    """(C, H, W) floats in [0, 1] -> (H, W, C) uint8 for mlflow.log_image."""
    pixels = (grid.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels


def usage_histogram(counts: torch.Tensor, height: int = 64) -> np.ndarray:
    """Per-code counts (K,) -> (height, K, 3) uint8 bar chart, codes sorted by count."""
    counts = counts.double().sort(descending=True).values
    bars = (counts / counts.max().clamp(min=1) * height).round().long()  # (K,)
    rows = torch.arange(height, 0, -1).unsqueeze(1)  # (height, 1)
    image = (rows <= bars.unsqueeze(0)).numpy()  # (height, K) bool
    return np.where(image[..., None], np.uint8(40), np.uint8(235)).repeat(3, axis=2)


class RankZeroLogger:
    def __init__(self, tracking_uri: str, run_id: str, log_images: bool, total_steps: int, board=None):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        # Reattach to the driver's run; system metrics (CPU, memory, GPU) are sampled from here.
        self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        self.mlflow = mlflow
        self.log_images = log_images
        self.total_steps = total_steps
        self.board = board  # the driver's ProgressBoard actor, or None
        self._first_log: tuple[int, float] | None = None  # (step, time) of this attempt's first log

    def log_step(self, step: int, output: Any, stats: dict[str, Any], img_s: float, extra: dict[str, float]) -> None:
        metrics = {f"train/{k}": float(v) for k, v in output.metrics.items() if torch.as_tensor(v).numel() == 1}
        metrics.update({"train/loss": stats["loss"], "train/grad_norm": stats["grad_norm"], "train/lr": stats["lr"],
                        "train/img_per_s": img_s, **{f"train/{k}": float(v) for k, v in extra.items()}})
        self.mlflow.log_metrics(_finite(metrics), step=step)
        if self.board is not None:
            self.board.post.remote(("step", step, f"loss {stats['loss']:.4f}  {img_s:.0f} img/s"))
            return
        now = time.time()
        first_step, first_time = self._first_log = self._first_log or (step, now)
        seconds_per_step = (now - first_time) / (step - first_step) if step > first_step else float("nan")
        eta = f"{seconds_per_step * (self.total_steps - step):.0f}s" if step > first_step else "?"
        say(f"step {step}/{self.total_steps}  loss {stats['loss']:.4f}  {img_s:.0f} img/s  ETA {eta}")

    def log_validation(
        self, step: int, metrics: dict[str, float], counts: list[torch.Tensor], model: torch.nn.Module, batch: Any
    ) -> None:
        self.mlflow.log_metrics(_finite(metrics), step=step)
        self.say(step, f"step {step}/{self.total_steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.log_images and batch is not None:
            self._log_images(step, model, batch)
        for level, level_counts in enumerate(counts):  # whole-split counts, (stages, K) per level
            histogram = usage_histogram(level_counts.sum(0).cpu())
            self.mlflow.log_image(histogram, artifact_file=f"codebook_usage/level{level}_step_{step:07d}.png")

    def say(self, step: int, line: str) -> None:
        """A progress line above the driver's bar (or on stdout without a board)."""
        if self.board is not None:
            self.board.post.remote(("line", step, line))
        else:
            say(line)

    @torch.no_grad()
    def _log_images(self, step: int, model: torch.nn.Module, batch: Any) -> None:
        was_training = model.training
        model.eval()
        x, y = to_model_input(batch)
        for folder, grid in image_panels(model, x[:16], y[:16]):  # x: (≤16, C, H, W)
            self._image(grid, f"{folder}/step_{step:07d}.png")
        model.train(was_training)

    def _image(self, grid: torch.Tensor, name: str) -> None:
        self.mlflow.log_image(_to_hwc_uint8(grid), artifact_file=name)

    def finish(self) -> None:
        self.mlflow.end_run()


SAMPLE_TEMPERATURES = (1.0, 0.8, 0.6, 0.4)  # one row of samples each: lower is smoother, less diverse


def image_panels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(folder, grid) for every view `model` supports, chosen by what it offers, not by its kind:
    reconstructions (any model), samples (a `sample` method), interpolations (continuous codes)."""
    pairs = torch.cat([x, model(x, y).recon.float()])  # originals row(s), then reconstructions
    panels = [("reconstructions", make_grid(pairs, nrow=8))]
    if callable(getattr(model, "sample", None)):
        n = min(8, x.shape[0])
        rows = [model.sample(n, y=y[:n], temperature=t) for t in SAMPLE_TEMPERATURES]  # each (n, C, H, W)
        panels.append(("samples", make_grid(torch.cat(rows), nrow=n)))
    if has_latent_paths(model) and x.shape[0] >= 8:
        path = interpolate(model, x[:4], x[4:8], steps=8, mode="slerp", y0=y[:4], y1=y[4:8])  # (4·8, C, H, W)
        panels.append(("interpolations", make_grid(path, nrow=8)))
    return panels


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if np.isfinite(v)}
