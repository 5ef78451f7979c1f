"""`tokenmill bench tokenize --kl-vs-fastdit`: precomputing `AutoencoderKL` latents with tokenmill
against fast-DiT's `extract_features.py` loop, on the same N 32x32 RGB images.

- tokenmill: `tokenize --model diffusers:KL --latents sample` from PNG shards into one Zarr store
  (actors start, read, decode, encode, write, markers, finalize all timed).
- fast-DiT-style baseline: an ImageFolder-like dataset of the same images as PNG files, a
  DataLoader (1 worker process, the same batch size), `encode(x).latent_dist.sample() * scale`,
  then one `np.save` per sample for its latents and one for its label, as fast-DiT writes them.

Reported: img/s of both, their ratio, and the number of files each wrote. The model is a tiny
randomly initialised AutoencoderKL (speed does not depend on training).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TINY_KL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.18215)


def benchmark_kl(root: Path, n: int, batch_size: int, actors: int | None) -> dict[str, Any]:
    import torch
    from PIL import Image

    from pipeline.runtime.ray_connection import ensure_ray
    from pipeline.shards.synthetic import smooth_images, write_image_shards
    from pipeline.tokenize.driver import tokenize_dataset
    from pipeline.tokenize.options import TokenizeOptions
    from pipeline.tokens.diffusers_adapter import import_diffusers

    torch.manual_seed(0)
    model_dir = root / "kl"
    import_diffusers().AutoencoderKL(**TINY_KL).eval().save_pretrained(model_dir)
    images = smooth_images(n, seed=n, noise=True)
    shards = write_image_shards(images, root, "kl")
    folder = root / "imagefolder" / "0"  # ImageFolder layout: one class folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:07d}.png")

    baseline = _fastdit_loop(model_dir, folder, root / "features", batch_size)
    ensure_ray()
    store = root / "kl.zarr"
    started = time.perf_counter()
    summary = tokenize_dataset(f"diffusers:{model_dir}", shards, str(store),
                               TokenizeOptions(batch_size=batch_size, latents="sample", actors=actors, overwrite=True))
    seconds = time.perf_counter() - started
    assert summary.samples == n, summary
    result = {
        "images": n, "batch_size": batch_size,
        "tokenmill_img_s": n / seconds, "tokenmill_files": sum(1 for p in store.rglob("*") if p.is_file()),
        "tokenmill_startup_s": summary.startup_s,
        "fastdit_img_s": baseline["img_s"], "fastdit_files": baseline["files"],
    }
    result["vs_fastdit"] = result["tokenmill_img_s"] / result["fastdit_img_s"]
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def _fastdit_loop(model_dir: Path, folder: Path, out: Path, batch_size: int) -> dict[str, float]:
    """fast-DiT's extract_features.py, single process: DataLoader -> encode -> np.save per sample."""
    import numpy as np
    import torch
    from PIL import Image

    from pipeline.tokens.diffusers_adapter import import_diffusers

    class Folder(torch.utils.data.Dataset):  # ImageFolder + ToTensor + Normalize(0.5, 0.5)
        def __init__(self):
            self.paths = sorted(folder.glob("*.png"))

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            pixels = np.asarray(Image.open(self.paths[i]).convert("RGB"), dtype=np.float32)
            return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0, 0

    vae = import_diffusers().AutoencoderKL.from_pretrained(model_dir).eval()
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(Folder(), batch_size=batch_size, shuffle=False, num_workers=1)
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
