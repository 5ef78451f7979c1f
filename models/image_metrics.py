"""Importance-weighted estimate of log p(x) (Burda et al. 2016), next to the ELBO.

log p(x) ≥ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x): tighter as K grows and equal
to the ELBO's single-sample estimate at K = 1. A model provides
`log_terms(x, y, k) -> (log p(x|z), log p(z), log q(z|x))`, each (k, B); this module chunks K so
one forward pass sees at most `max_batch` rows (k·B), and reports nats per image.
Also PSNR, so the VQ family's training metrics, validation and benchmarks compute it alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def log_weights(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 100, max_batch: int = 4096
) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x) for k posterior samples: (k, B)."""
    chunk = max(1, min(k, max_batch // max(1, x.shape[0])))
    parts = []
    for start in range(0, k, chunk):
        log_px_z, log_pz, log_qz = model.log_terms(x, y, k=min(chunk, k - start))
        parts.append(log_px_z + log_pz - log_qz)
    return torch.cat(parts, dim=0)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1] from their mean squared error (any shape)."""
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def bits_per_dim(nats: Any, dims: int) -> Any:
    """Nats per image (a float or a tensor) -> bits per dimension."""
    return nats / (dims * math.log(2.0)) if dims else float("nan")


@torch.no_grad()
def iw_bounds(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 100, max_batch: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the importance-weighted bound on log p(x) and the ELBO (mean of the same log w), each (B,)."""
    return bounds_of_log_weights(log_weights(model, x, y, k, max_batch))


def bounds_of_log_weights(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log w (k, B) -> per image the importance-weighted bound on log p(x) and the ELBO, each (B,)."""
    return torch.logsumexp(lw, dim=0) - math.log(lw.shape[0]), lw.mean(0)


@torch.no_grad()
def importance_weighted_nll(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    k: int = 100,
    batch_size: int = 100,
    max_batch: int = 4096,
) -> dict[str, float]:
    """Mean over images of −log p(x) (IW bound, K samples) and −ELBO (mean of the same log w).

    x (N, C, H, W), y (N,) or None. Returns nll_nats, elbo_nats (the negative ELBO, so lower is
    better for both), bits_per_dim (of nll) and k.
    """
    was_training = model.training
    model.eval()
    iw_sum, elbo_sum = 0.0, 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        yb = None if y is None else y[start : start + batch_size]
        iw, elbo = iw_bounds(model, xb, yb, k, max_batch)  # (b,), (b,)
        iw_sum += float(iw.sum())
        elbo_sum += float(elbo.sum())
    model.train(was_training)
    n = x.shape[0]
    nll = -iw_sum / n
    return {"nll_nats": nll, "elbo_nats": -elbo_sum / n, "bits_per_dim": bits_per_dim(nll, x[0].numel()), "k": k}


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, 1], (B, C, H, W) each -> (B,): a Gaussian
    window (11, σ 1.5; smaller for images under 6 px) over the reflect-padded image, mean over
    channels and positions — torchmetrics' SSIM with data_range=1 (tests/unit/test_vqgan.py compares)."""
    x, y = x.double(), y.double()
    channels = x.shape[1]
    window = min(window, 2 * min(x.shape[-2:]) - 1)
    window -= 1 - window % 2  # odd
    pad = (window - 1) // 2
    coords = torch.arange(window, dtype=torch.float64, device=x.device) - pad
    g = torch.exp(-((coords / sigma) ** 2) / 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)  # (C, 1, k, k)

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> local means, same size
        return torch.nn.functional.conv2d(torch.nn.functional.pad(t, (pad,) * 4, mode="reflect"), kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = (blur(x * x) - mu_x**2).clamp(min=0), (blur(y * y) - mu_y**2).clamp(min=0)
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


def high_frequency_power(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Mean spectral power |FFT2|² of (B, C, H, W) images at radial frequencies above `cutoff`
    cycles/pixel (Nyquist is 0.5), per image (B,). The ratio reconstructions / originals says how
    much fine detail survives: 1.0 is as sharp as the data, blurry reconstructions are below 1."""
    x = x.double()
    power = torch.fft.fft2(x - x.mean((-2, -1), keepdim=True)).abs() ** 2  # (B, C, H, W)
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device, dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[-1], device=x.device, dtype=torch.float64)
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > cutoff  # (H, W)
    return power[..., high].mean((-1, -2)) if high.any() else power.new_zeros(x.shape[0])


class ReconstructionMetrics:
    """Sums over images of per-image MSE, PSNR, SSIM and high-frequency power (originals and
    reconstructions), in one float64 vector `totals` that callers may all-reduce across ranks.
    The one place these metrics are computed: `tokenmill train` validation, `tokenmill eval` and
    the benchmarks all call it."""

    NAMES = ("images", "mse", "psnr", "ssim", "hf_power_recon", "hf_power_data")

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.totals = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """x, recon: (B, C, H, W) in [0, 1]."""
        x, recon = x.double(), recon.double()
        mse = ((recon - x) ** 2).flatten(1).mean(1)  # (B,)
        parts = [torch.full_like(mse, 1.0), mse, psnr(mse), ssim(x, recon), high_frequency_power(recon),
                 high_frequency_power(x)]
        self.totals += torch.stack([p.sum() for p in parts]).to(self.totals.device)

    def result(self) -> dict[str, float]:
        """Means over images, and hf_ratio = high-frequency power of reconstructions / originals."""
        sums = dict(zip(self.NAMES, self.totals.tolist()))
        images = max(sums["images"], 1.0)
        return {"images": sums["images"], "mse": sums["mse"] / images, "psnr": sums["psnr"] / images,
                "ssim": sums["ssim"] / images,
                "hf_ratio": sums["hf_power_recon"] / sums["hf_power_data"] if sums["hf_power_data"] else float("nan")}
