"""Tiny randomly initialised diffusers autoencoders (VQ, KL, DC-AE) (saved with `save_pretrained`) and 32 px RGB
shards, for the `diffusers:` adapter tests and the tokenize benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 32
TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=SIZE)
SCALE, SHIFT = 0.5, 0.1  # the tiny KL's scaling factor, and the shift factor the tests give it


def save_tiny_kl(path: Path, seed: int = 0, **overrides) -> Path:
    """An `AutoencoderKL` (32 px RGB -> 4 x 16 x 16 latents) with an SD-like scaling factor."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**{**TINY, "scaling_factor": SCALE, **overrides}).eval().save_pretrained(path)
    return path


def save_tiny_vq(path: Path, seed: int = 0) -> Path:
    """A `VQModel` (32 px RGB -> 16 x 16 codes of 32)."""
    import torch
    from diffusers import VQModel

    torch.manual_seed(seed)
    VQModel(**TINY, num_vq_embeddings=32).eval().save_pretrained(path)
    return path


# the smallest AutoencoderDC of both block kinds: 32 px RGB -> 4 x 16 x 16 latents (one downsampling level)
TINY_DC = dict(in_channels=3, latent_channels=4, attention_head_dim=4,
               encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
               decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)))


def save_tiny_dc(path: Path, seed: int = 0, sample_size: int | None = None, **overrides) -> Path:
    """An `AutoencoderDC` (DC-AE) with a scaling factor. It has no shift factor, and its config no
    sample_size unless one is written in (diffusers ignores the key; tokenmill sizes images by it)."""
    import json

    import torch
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    AutoencoderDC(**{**TINY_DC, "scaling_factor": SCALE, **overrides}).eval().save_pretrained(path)
    if sample_size:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "sample_size": sample_size}))
    return path


def rgb_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 32, 32, 3) uint8: coloured blobs on noise, asymmetric so a flip changes the codes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(6, 26, (2, n, 1, 1))
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(4, 10, (n, 1, 1)) ** 2)[..., None]
    colour = rng.integers(60, 255, (n, 1, 1, 3))
    ramp = (xx * 4)[None, :, :, None]  # left-to-right ramp: mirrored images differ
    return (blob * colour + ramp // 2 + rng.integers(0, 30, (n, SIZE, SIZE, 3))).clip(0, 255).astype(np.uint8)


def write_rgb_shards(dest: str, source_dir: Path, n: int, maxcount: int = 8) -> str:
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    source_dir.mkdir(parents=True, exist_ok=True)
    np.save(source_dir / "images.npy", rgb_images(n))
    np.save(source_dir / "labels.npy", np.arange(n) % 10)
    settings = ShardSettings(maxcount=maxcount, val_fraction=0.0, labels=str(source_dir / "labels.npy"))
    write_shards(str(source_dir / "images.npy"), dest, settings, progress=False)
    return dest
