"""What the image tasks measure and show: validation over the whole split, and image panels.

Ray Train splits the validation stream between ranks without dropping rows
(`pipeline.training.tasks.image_data.ingest_config`: `streaming_split(equal=False)`), so each rank decodes
and evaluates only its own share; the sums are all-reduced once at the end, so every rank returns
the same numbers (which makes early-stopping decisions identical) and no sample is dropped or
counted twice. The model's forward runs under the training precision's autocast; every metric is
computed in fp32 (or fp64) from its outputs, outside it. `val/images` is the number of images counted.
VAE family: importance-weighted NLL and ELBO (nats per image) and bits/dim.
VQ family: MSE, PSNR, SSIM (means over images) and hf_ratio from `models.image_metrics.ReconstructionMetrics`
(the code `tokenmill eval` uses), and codebook usage / perplexity from counts accumulated over the
whole split (per level for two-level models; a multi-scale quantizer's scales share one codebook
and count as one level).
Panels (rank 0): reconstructions, samples at several temperatures, latent interpolations and the
codebook usage histogram, each where the model offers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from tokenmill.models.code_usage import code_counts, usage_and_perplexity
from tokenmill.models.image_metrics import ReconstructionMetrics, bits_per_dim, bounds_of_log_weights, log_weights
from tokenmill.models.latent_ops import has_latent_paths, interpolate, make_grid
from tokenmill.models.tokenizer import code_scales, counted_levels
from tokenmill.pipeline.shards.stream import to_model_input
from tokenmill.pipeline.training.precision import autocast


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[Any], iw_samples: int, rank: int = 0, world_size: int = 1,
    precision: str = "fp32",
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """`batches`: this rank's share of the validation stream (disjoint from the other ranks');
    `precision`: the forward's autocast (a resolved `train.precision`). Returns the metrics and,
    for VQ models, the per-level (stages, K) code counts."""
    sums = accumulate(model, batches, iw_samples, precision)
    if world_size > 1:
        sums.all_reduce()
    return sums.result()


@dataclass
class ValidationSums:
    """What one share of the split adds up to: every metric is a ratio of these sums, so shares
    merge by adding them (`+`, or `all_reduce` across ranks) and the merge equals one pass."""

    is_vae: bool
    totals: torch.Tensor  # (3,) float64, VAE: images, -IW bound sum, -ELBO sum
    recon: torch.Tensor  # (len(ReconstructionMetrics.NAMES),) float64, VQ family
    counts: list[torch.Tensor]  # VQ: per level (stages, K) int64 code counts
    pixels: int = 0  # values per image (bits/dim); 0 until a batch is seen

    @property
    def images(self) -> float:
        return float(self.totals[0] if self.is_vae else self.recon[0])

    def __add__(self, other: ValidationSums) -> ValidationSums:
        return ValidationSums(self.is_vae, self.totals + other.totals.to(self.totals.device),
                              self.recon + other.recon.to(self.recon.device),
                              [a + b.to(a.device) for a, b in zip(self.counts, other.counts)],
                              max(self.pixels, other.pixels))

    def all_reduce(self) -> None:
        for tensor in (self.totals, self.recon, *self.counts):
            dist.all_reduce(tensor)

    def cpu(self) -> ValidationSums:
        return ValidationSums(self.is_vae, self.totals.cpu(), self.recon.cpu(), [c.cpu() for c in self.counts],
                              self.pixels)

    def result(self) -> tuple[dict[str, float], list[torch.Tensor]]:
        """The metrics of these sums and the per-level code counts (see `evaluate`)."""
        images = max(float(self.totals[0]), 1.0)
        if self.is_vae:
            nll = float(self.totals[1]) / images
            return {"val/images": float(self.totals[0]), "val/nll_nats": nll,
                    "val/elbo_nats": float(self.totals[2]) / images,
                    "val/bits_per_dim": bits_per_dim(nll, self.pixels)}, []
        recon = ReconstructionMetrics(self.recon.device)
        recon.totals = self.recon
        metrics = {f"val/{k}": v for k, v in recon.result().items()}
        for level, level_counts in enumerate(self.counts):
            usage, perplexity = usage_and_perplexity(level_counts.cpu())
            suffix = "" if len(self.counts) == 1 else f"_level{level}"
            metrics[f"val/usage{suffix}"] = float(usage)
            metrics[f"val/perplexity{suffix}"] = float(perplexity)
        return metrics, self.counts


@torch.no_grad()
def accumulate(model: torch.nn.Module, batches: Iterable[Any], iw_samples: int,
               precision: str = "fp32") -> ValidationSums:
    """The sums of one share of the validation split (on the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    is_vae = getattr(model, "has_kl", False)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    recon = ReconstructionMetrics(device)
    counts: list[torch.Tensor] = []  # per level: (stages, K) code counts
    pixels = 0
    for batch in batches:
        x, y = to_model_input(batch, device)  # x: (B, C, H, W) in [0, 1], on the model's device
        pixels = x[0].numel()
        if is_vae:
            with autocast(precision, device):
                lw = log_weights(model, x, y, k=iw_samples)  # (k, B)
            iw, elbo = bounds_of_log_weights(lw.float())  # (B,) log p(x) bound, (B,) ELBO
            totals += torch.stack([torch.tensor(float(x.shape[0]), device=device), -iw.sum(), -elbo.sum()]).double()
        else:
            with autocast(precision, device):
                output = model(x, y)
            recon.update(x, output.recon.float())
            levels = counted_levels(model, output.indices)
            batch_counts = [_level_counts(model, level) for level in levels]
            counts = batch_counts if not counts else [a + b for a, b in zip(counts, batch_counts)]
    model.train(was_training)
    if not is_vae and not counts:  # this share held no batch: zeros of the right shape
        counts = [torch.zeros(s, model.codebook_size, dtype=torch.long, device=device) for s in _level_stages(model)]
    return ValidationSums(is_vae, totals, recon.totals, counts, pixels)


def _level_counts(model: torch.nn.Module, indices: torch.Tensor) -> torch.Tensor:
    stages = indices.shape[-1] if indices.dim() == 4 else 1  # residual VQ: (B, h, w, stages)
    return code_counts(indices, model.codebook_size, stages)


def _level_stages(model: torch.nn.Module) -> list[int]:
    shape = model.token_shape
    if code_scales(model):  # one shared codebook over every scale: one level (counted_levels)
        return [1]
    if isinstance(shape[0], tuple):  # two-level model: one shape per level
        return [s[2] if len(s) == 3 else 1 for s in shape]
    return [shape[2] if len(shape) == 3 else 1]


SAMPLE_TEMPERATURES = (1.0, 0.8, 0.6, 0.4)  # one row of samples each: lower is smoother, less diverse


@torch.no_grad()
def image_panels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(folder, (C, H, W) grid) for every view `model` supports, chosen by what it offers, not by
    its kind: reconstructions (any model), samples (a `sample` method), interpolations (continuous codes)."""
    was_training = model.training
    model.eval()
    pairs = torch.cat([x, model(x, y).recon.float()])  # originals row(s), then reconstructions
    panels = [("reconstructions", make_grid(pairs, nrow=8))]
    if callable(getattr(model, "sample", None)):
        n = min(8, x.shape[0])
        rows = [model.sample(n, y=y[:n], temperature=t) for t in SAMPLE_TEMPERATURES]  # each (n, C, H, W)
        panels.append(("samples", make_grid(torch.cat(rows), nrow=n)))
    if has_latent_paths(model) and x.shape[0] >= 8:
        path = interpolate(model, x[:4], x[4:8], steps=8, mode="slerp", y0=y[:4], y1=y[4:8])  # (4·8, C, H, W)
        panels.append(("interpolations", make_grid(path, nrow=8)))
    model.train(was_training)
    return panels


def usage_histogram(counts: torch.Tensor, height: int = 64) -> np.ndarray:
    """Per-code counts (K,) -> (height, K, 3) uint8 bar chart, codes sorted by count."""
    counts = counts.double().sort(descending=True).values
    bars = (counts / counts.max().clamp(min=1) * height).round().long()  # (K,)
    rows = torch.arange(height, 0, -1).unsqueeze(1)  # (height, 1)
    image = (rows <= bars.unsqueeze(0)).numpy()  # (height, K) bool
    return np.where(image[..., None], np.uint8(40), np.uint8(235)).repeat(3, axis=2)
