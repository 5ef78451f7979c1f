"""Validation over the whole validation split, shared across ranks.

Ray Train splits the validation stream between ranks without dropping rows
(`pipeline.training.data.ingest_config`: `streaming_split(equal=False)`), so each rank decodes
and evaluates only its own share; the sums are all-reduced once at the end, so every rank returns
the same numbers (which makes early-stopping decisions identical) and no sample is dropped or
counted twice. `val/images` is the number of images counted.
VAE family: importance-weighted NLL and ELBO (nats per image) and bits/dim.
VQ family: MSE, PSNR, SSIM (means over images) and hf_ratio from `models.image_metrics.ReconstructionMetrics`
(the code `tokenmill eval` uses), and codebook usage / perplexity from counts accumulated over the
whole split (per level for two-level models).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from models.code_usage import code_counts, usage_and_perplexity
from models.image_metrics import ReconstructionMetrics, bits_per_dim, iw_bounds
from pipeline.shards.stream import to_model_input


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[Any], iw_samples: int, rank: int = 0, world_size: int = 1
) -> tuple[dict[str, float], list[torch.Tensor]]:
    """`batches`: this rank's share of the validation stream (disjoint from the other ranks').
    Returns the metrics and, for VQ models, the per-level (stages, K) code counts."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    is_vae = getattr(model, "has_kl", False)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # VAE: images, then two metric sums
    recon = ReconstructionMetrics(device)  # VQ family
    counts: list[torch.Tensor] = []  # per level: (stages, K) code counts
    pixels = 0
    for batch in batches:
        x, y = to_model_input(batch)  # x: (B, C, H, W) in [0, 1], on the model's device
        pixels = x[0].numel()
        if is_vae:
            iw, elbo = iw_bounds(model, x, y, k=iw_samples)  # (B,) log p(x) bound, (B,) ELBO
            totals += torch.stack([torch.tensor(float(x.shape[0]), device=device), -iw.sum(), -elbo.sum()]).double()
        else:
            output = model(x, y)
            recon.update(x, output.recon)
            levels = output.indices if isinstance(output.indices, tuple) else (output.indices,)
            batch_counts = [_level_counts(model, level) for level in levels]
            counts = batch_counts if not counts else [a + b for a, b in zip(counts, batch_counts)]
    model.train(was_training)

    if not is_vae and not counts:  # this rank saw no batch: contribute zeros of the right shape
        counts = [torch.zeros(s, model.codebook_size, dtype=torch.long, device=device) for s in _level_stages(model)]
    if world_size > 1:
        dist.all_reduce(totals)
        dist.all_reduce(recon.totals)
        for level_counts in counts:
            dist.all_reduce(level_counts)
    images = max(float(totals[0]), 1.0)
    if is_vae:
        nll = float(totals[1]) / images
        return {"val/images": float(totals[0]), "val/nll_nats": nll, "val/elbo_nats": float(totals[2]) / images,
                "val/bits_per_dim": bits_per_dim(nll, pixels)}, []
    metrics = {f"val/{k}": v for k, v in recon.result().items()}
    for level, level_counts in enumerate(counts):
        usage, perplexity = usage_and_perplexity(level_counts.cpu())
        suffix = "" if len(counts) == 1 else f"_level{level}"
        metrics[f"val/usage{suffix}"] = float(usage)
        metrics[f"val/perplexity{suffix}"] = float(perplexity)
    return metrics, counts


def _level_counts(model: torch.nn.Module, indices: torch.Tensor) -> torch.Tensor:
    stages = indices.shape[-1] if indices.dim() == 4 else 1  # residual VQ: (B, h, w, stages)
    return code_counts(indices, model.codebook_size, stages)


def _level_stages(model: torch.nn.Module) -> list[int]:
    shape = model.token_shape
    if isinstance(shape[0], tuple):  # two-level model: one shape per level
        return [s[2] if len(s) == 3 else 1 for s in shape]
    return [shape[2] if len(shape) == 3 else 1]
