"""Other projects' implementations behind our interfaces, for the benchmarks' same-run comparisons.

- vector-quantize-pytorch: `PeerQuantizer` puts any of its quantizer modules (VectorQuantize,
  ResidualVQ, FSQ, LFQ, SimVQ) behind our quantizer interface, so it can replace ours inside the
  same VQ-VAE (`bench quantizers`; which module with which settings is the benchmark's choice).
- fast-DiT: `fastdit_extract` is its `extract_features.py` loop (`bench tokenize --kl-vs-fastdit`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmill.models.quantizers import QuantizerOutput


class PeerQuantizer(nn.Module):
    """A vector-quantize-pytorch module as our quantizer: (B, h, w, D) -> QuantizerOutput(codes,
    indices (B, h, w[, stages]), loss). `call_options` go to every call (e.g. LFQ's
    inv_temperature); modules that return no loss (FSQ) get a zero one."""

    def __init__(self, peer: nn.Module, codebook_size: int, stages: int = 1,
                 call_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.codebook_size, self.num_stages = codebook_size, stages
        self.peer, self.options = peer, dict(call_options or {})

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, h, w, d = z.shape
        out = self.peer(z.reshape(b, h * w, d), **self.options)  # (codes, indices[, loss])
        loss = out[2].sum() if len(out) > 2 else z.new_zeros(())
        return QuantizerOutput(out[0].reshape(z.shape), out[1].reshape(b, h, w, *out[1].shape[2:]), loss)


class PngFolder:
    """The PNGs of a folder in name order as a map-style dataset of ((3, H, W) float32, label 0):
    what the peers' ImageFolder + ToTensor (+ Normalize) give, as pixels / divisor - offset."""

    def __init__(self, folder: Path, divisor: float, offset: float):
        self.paths, self.divisor, self.offset = sorted(folder.glob("*.png")), divisor, offset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import numpy as np
        import torch
        from PIL import Image

        pixels = np.asarray(Image.open(self.paths[i]).convert("RGB"), dtype=np.float32)
        return torch.from_numpy(pixels).permute(2, 0, 1) / self.divisor - self.offset, 0


def fastdit_extract(model_dir: Path, folder: Path, out: Path, batch_size: int) -> dict[str, float]:
    """fast-DiT's extract_features.py, single process, on the PNGs in `folder` with the diffusers
    AutoencoderKL saved at `model_dir`: DataLoader (1 worker) -> encode -> sample * 0.18215 ->
    one np.save per sample for its latents and one for its label under `out`. Returns img/s and
    the number of files written."""
    import numpy as np
    import torch

    from tokenmill.pipeline.tokens.diffusers_adapter import import_diffusers

    vae = import_diffusers().AutoencoderKL.from_pretrained(model_dir).eval()
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    images = PngFolder(folder, 127.5, 1.0)  # ToTensor + Normalize(0.5, 0.5): [-1, 1]
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=1)
    started, step = time.perf_counter(), 0
    with torch.no_grad():
        for x, y in loader:
            latents = vae.encode(x).latent_dist.sample().mul_(0.18215).numpy()
            for feature, label in zip(latents, y.numpy()):
                np.save(out / "features" / f"{step}.npy", feature[None])
                np.save(out / "labels" / f"{step}.npy", label[None])
                step += 1
    seconds = time.perf_counter() - started
    return {"img_s": step / seconds, "files": sum(1 for p in out.rglob("*.npy"))}
