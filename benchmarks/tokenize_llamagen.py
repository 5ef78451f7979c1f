"""`tokenmill bench tokenize --llamagen-vs-extract`: LlamaGen codes of N images with
`tokenize --model llamagen:CKPT --augment flip` against LlamaGen's own extraction loop
(`autoregressive/train/extract_codes_c2i.py`), in the same run, on the same checkpoint.

- The checkpoint: a randomly initialised LlamaGen `VQModel` written as LlamaGen releases its
  weights (`{"model": state_dict}` under LlamaGen's key names, as `vq_ds16_c2i.pt`), in a small
  VQ-8-style layout (`LAYOUT`: ch 16, ch_mult (1, 2, 2, 4), 2 res blocks, attention, z 32, the
  published 16384 x 8 l2-normalised codebook) at 32 px: 4x4 codes (speed does not depend on training).
- tokenmill: PNG shards -> one Zarr store, each image and its mirror (`--augment flip`), actors
  starting, reading, decoding, encoding, writing, markers and finalize all timed.
- LlamaGen-style loop (`llamagen_extract`): the same images as PNG files, a DataLoader of batch
  size 1 (the script's own, "important!") with one worker process, each image encoded with its
  mirror (`torch.cat([x, x.flip(-1)])`, as the script does without --ten-crop), then one `np.save`
  of its (1, 2, h*w) codes and one of its label. LlamaGen's `VQModel` is not installable, so the
  loop runs tokenmill's conversion of the same checkpoint, which equals LlamaGen's `vq_model.py`
  (tests/unit/test_llamagen_convert.py); both sides run the same network and the loop's cost is the
  loop's own. The bench asserts that both give the same codes for every image and mirror, up to
  fp32 near-ties flipped by the batch size (at most 1 in 10,000 codes; `codes_differing`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SIZE = 32
LAYOUT = {"in_channels": 3, "ch": 16, "ch_mult": (1, 2, 2, 4), "num_res_blocks": 2, "z_channels": 32,
          "codebook_size": 16384, "codebook_embed_dim": 8}


def write_llamagen_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random LlamaGen VQModel of `LAYOUT` at `path`, in the released format: tokenmill's model of
    that layout, its weights renamed (and attention's fused q/k/v split) back to LlamaGen's keys."""
    import torch

    from tokenmill.models.converters.llamagen import ARG_DEFAULTS, key_plan, translate

    torch.manual_seed(seed)
    model = translate(LAYOUT, {**ARG_DEFAULTS, "image_size": IMAGE_SIZE}, "bench")
    state = model.state_dict()
    released = {source: part.clone() for key, sources in key_plan(model).items()
                for source, part in zip(sources, state[key].chunk(len(sources)))}  # dim 0 split n ways
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": released}, path)
    return path


def llamagen_extract(ref: str, folder: Path, out: Path) -> dict[str, Any]:
    """extract_codes_c2i.py on one process (module docstring): returns img/s, files written and the
    codes, (N, 2, h*w) in file order."""
    import torch

    from tokenmill.benchmarks.peers import PngFolder
    from tokenmill.pipeline.registry.model_ref import resolve_model

    vq_model = resolve_model(ref).load()[0].eval()
    for name in ("codes", "labels"):
        (out / name).mkdir(parents=True, exist_ok=True)
    images = PngFolder(folder, 255.0, 0.0)  # ToTensor: [0, 1] (tokenmill's model maps it to [-1, 1])
    loader = torch.utils.data.DataLoader(images, batch_size=1, shuffle=False, num_workers=1)
    started, total, codes = time.perf_counter(), 0, []
    with torch.no_grad():
        for x, y in loader:
            x_all = torch.cat([x, torch.flip(x, dims=[-1])])  # (2, 3, H, W): the image, its mirror
            indices = vq_model.encode(x_all)  # (2, h, w)
            code = indices.reshape(x.shape[0], 2, -1).numpy()  # (1, 2, h*w)
            np.save(out / "codes" / f"{total}.npy", code)
            np.save(out / "labels" / f"{total}.npy", y.numpy())
            codes.append(code[0])
            total += 1
    seconds = time.perf_counter() - started
    return {"img_s": total / seconds, "files": sum(1 for _ in out.rglob("*.npy")), "codes": np.stack(codes)}


def benchmark_llamagen(root: Path, n: int, batch_size: int, actors: int | None) -> dict[str, Any]:
    """Both sides on the same N 32x32 images and checkpoint; their codes must be equal."""
    from PIL import Image

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.synthetic import smooth_images, write_image_shards
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    ref = f"llamagen:{write_llamagen_checkpoint(root / 'vq_tiny_c2i.pt')},{IMAGE_SIZE}"
    images = smooth_images(n, seed=n, noise=True)  # (n, 32, 32, 3) uint8
    shards = write_image_shards(images, root, "llamagen")
    folder = root / "imagefolder" / "0"  # ImageFolder layout: one class folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:07d}.png")

    baseline = llamagen_extract(ref, folder, root / "llamagen-codes")
    ensure_ray()
    store = root / "llamagen.zarr"
    started = time.perf_counter()
    summary = tokenize_dataset(ref, shards, str(store), TokenizeOptions(batch_size=batch_size, augment="flip",
                                                                        actors=actors, overwrite=True))
    seconds = time.perf_counter() - started
    assert summary.samples == n, summary
    # Batch 64 vs batch 2 run different fp32 conv kernels: a near-tie between two of the 16384 codes
    # can flip (1 of 64,000 codes at N = 2000); anything beyond that is a real difference.
    differing = int((_store_codes(store, n) != baseline["codes"]).sum())
    assert differing <= 1e-4 * baseline["codes"].size, f"{differing} of tokenmill's codes differ from the loop's"
    result = {
        "images": n, "batch_size": batch_size, "codes_differing": differing, "codes": int(baseline["codes"].size),
        "tokenmill_img_s": n / seconds, "tokenmill_files": sum(1 for p in store.rglob("*") if p.is_file()),
        "tokenmill_startup_s": summary.startup_s,
        "llamagen_img_s": baseline["img_s"], "llamagen_files": baseline["files"],
    }
    result["vs_llamagen"] = result["tokenmill_img_s"] / result["llamagen_img_s"]
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


def _store_codes(store: Path, n: int) -> np.ndarray:
    """The store's codes as the loop orders them: (n, 2 variants, h*w), row i = source image i."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    valid = group["valid"][:]
    codes = group["codes"].oindex[valid]  # (n, variant, h, w), in store order
    index = np.array([int(str(key).rsplit("-", 1)[-1]) for key in group["keys"].oindex[valid]])  # "<stem>-0000042"
    ordered = np.empty_like(codes)
    ordered[index] = codes
    return ordered.reshape(n, codes.shape[1], -1)
