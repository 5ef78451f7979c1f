"""Write image batches as PNG grids (reconstructions, samples, interpolations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenmill.models.latent_ops import make_grid


def save_png_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """images (N, C, H, W) or one (C, H, W), floats in [0, 1], C in {1, 3} -> PNG at `path`."""
    tensor = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images).detach().float().cpu()
    if tensor.dim() == 4:
        tensor = make_grid(tensor, nrow=nrow, padding=padding)
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) with C in 1 or 3, got {tuple(tensor.shape)}")
    pixels = (tensor.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, C)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)
    return path
