"""Builders shared by the token store / tokenize / TokenDataset tests: a tiny untrained VQ-VAE
(no training needed for exactly-once and layout properties), small uneven shards, finished stores
written through the store API, the inputs and reference run of the tokenize tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from helpers import CONFIGS
from helpers.threads import one_torch_thread

IMAGE_SIZE = 16


def make_vqvae(path: Path, codebook_size: int = 64, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(seed)
    config = VQVAEConfig(in_channels=1, image_size=image_size, hidden=8, res_blocks=1, downsample=4, latent_dim=8,
                         quantizer=QuantizerConfig(codebook_size=codebook_size))
    model = VQVAE(config)
    # One training-mode forward runs the k-means initialisation, so untrained codes still vary.
    model.train()(torch.from_numpy(images(256, seed=99)).permute(0, 3, 1, 2).float() / 255.0)
    return save_model(model.eval(), path)


def make_vqvae2(path: Path, codebook_size: int = 64, image_size: int = IMAGE_SIZE) -> Path:
    """An untrained two-level VQ-VAE-2: top codes (image_size / 8)², bottom (image_size / 4)²."""
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.quantizers import QuantizerConfig
    from tokenmill.models.vqvae import VQVAE2, VQVAE2Config

    torch.manual_seed(0)
    config = VQVAE2Config(in_channels=1, image_size=image_size, hidden=8, res_blocks=1, latent_dim=4,
                          quantizer=QuantizerConfig(codebook_size=codebook_size))
    return save_model(VQVAE2(config).eval(), path)


def make_vae(path: Path) -> Path:
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.vae import GaussianVAE, VAEConfig

    torch.manual_seed(0)
    return save_model(GaussianVAE(VAEConfig(image_size=IMAGE_SIZE, channels=1, latent_dim=4, hidden=8)).eval(), path)


def images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 16, 16, 1) uint8 blobs: structured enough that codes vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    cy, cx = rng.uniform(3, 13, (2, n, 1, 1))
    r = rng.uniform(2, 6, (n, 1, 1))
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * 200 + rng.integers(0, 40, (n, IMAGE_SIZE, IMAGE_SIZE))
    return blob.astype(np.uint8)[..., None]


def write_shards(dest: str, source_dir: Path, n: int = 46, storage_options: dict | None = None) -> str:
    """Shards written by the project's shard writer from an .npy source (labels = index % 10):
    train shards of 9, 9, 9, 9, <9 and a smaller val shard, i.e. uneven sizes."""
    from tokenmill.pipeline.shards.writer import ShardSettings
    from tokenmill.pipeline.shards.writer import write_shards as write

    source_dir.mkdir(parents=True, exist_ok=True)
    np.save(source_dir / "images.npy", images(n))
    np.save(source_dir / "labels.npy", np.arange(n) % 10)
    settings = ShardSettings(maxcount=9, val_fraction=0.2, labels=str(source_dir / "labels.npy"))
    write(str(source_dir / "images.npy"), dest, settings, storage_options=storage_options, progress=False)
    return dest


def plant_corrupt(tar_path: Path) -> list[str]:
    """Replace the second sample's image with garbage and append a sample without an image;
    returns the keys of both. The manifest stays valid: it counts samples with an image member."""
    with tarfile.open(tar_path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    bad = keys[1]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for member, data in members:
            if member.name.startswith(bad + ".") and member.name.endswith(".png"):
                data = data[:40]  # a PNG header with its pixel data cut off
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        extra = tarfile.TarInfo("zz-no-image.cls")
        extra.size = 1
        archive.addfile(extra, io.BytesIO(b"3"))
    tar_path.write_bytes(out.getvalue())
    return [bad, "zz-no-image"]


def array_bytes(store: Path) -> dict[str, bytes]:
    """Every object of the store's arrays (codes, keys, labels, shard table, codebook counts),
    by relative path: what "byte for byte identical arrays" compares. Markers and the report
    group are progress records, not arrays."""
    out = {}
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store).as_posix()
        if path.is_file() and not rel.startswith(("markers/", "report/")):
            out[rel] = path.read_bytes()
    return out


def s3_objects(fs, root: str) -> dict[str, bytes]:
    """`array_bytes` of a store (or any folder) on S3: every object under `root` by relative
    path, without a store's progress records (markers, report)."""
    paths = sorted(p for p in fs.find(root) if not p[len(root) + 1:].startswith(("markers/", "report/")))
    return {p[len(root) + 1:]: fs.cat_file(p) for p in paths}


TOKENIZE_IMAGES = 46  # the tokenize tests' source images: shards of 9, 9, 9, 9, <9 train + val


def tokenize_data(root: Path, n: int = TOKENIZE_IMAGES) -> dict:
    """The tokenize tests' inputs under `root`: an untrained VQ-VAE and `n` images as uneven
    shards (`write_shards`) whose first train shard holds a corrupt image and an image-less sample."""
    model = make_vqvae(root / "model")
    shards = write_shards(str(root / "shards"), root / "source", n=n)
    corrupt = plant_corrupt(sorted((root / "shards").glob("train-*.tar"))[0])
    return {"root": root, "model": str(model), "shards": shards, "corrupt": corrupt}


def tokenize_reference(data: dict) -> dict:
    """An uninterrupted run over `tokenize_data`'s inputs (on the Ray instance of this process):
    what every interrupted run must equal byte for byte."""
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    store = data["root"] / "reference.zarr"
    summary = tokenize_dataset(data["model"], data["shards"], str(store), TokenizeOptions(batch_size=4, actors=2))
    return {"store": store, "summary": summary}


def build_store(url: str, counts: list[int], splits: list[str], levels: int = 1, codebook_size: int = 50,
                seed: int = 0, max_units: int | None = None):
    """A finished token store written through the store API alone (no model, no Ray): input
    shard i has counts[i] good samples with random codes, keys "s{i}-{j}", labels j % 7;
    `max_units` groups input shards into fewer work units (see `plan_layout`).
    Returns (layout, specs, codes per level in item order)."""
    from tokenmill.pipeline.tokens import store_code_stats
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore

    rng = np.random.default_rng(seed)
    shapes = [(2, 2), (4, 4)][:levels]
    names = ["codes"] if levels == 1 else [f"codes_{i}" for i in range(levels)]
    specs = [ArraySpec(n, s, "uint16", codebook_size) for n, s in zip(names, shapes)]
    layout = plan_layout([(f"shard-{i}.tar", split, n) for i, (n, split) in enumerate(zip(counts, splits))],
                         max(s.row_bytes for s in specs), max_units)
    store = TokenStore(url)
    store.prepare({"model_uri": "test", "weights_sha256": "0" * 64, "mode": "codes"}, layout, specs, overwrite=False)
    written = {s.name: [] for s in specs}
    for unit in layout.units:
        writer, results = store.writer(unit, layout.rows_per_zarr_shard, specs), []
        for shard in unit.shards:
            n = shard.count
            columns = {s.name: rng.integers(0, codebook_size, (n, *s.row_shape)).astype(np.uint16) for s in specs}
            writer.append({**columns, "keys": np.array([f"s{shard.index}-{j}" for j in range(n)], dtype=object),
                           "labels": np.arange(n, dtype=np.int64) % 7})
            counts_sparse = {s.name: store_code_stats.to_sparse(store_code_stats.count_codes(columns[s.name], codebook_size))
                             for s in specs}
            results.append({"rows": writer.end_shard(), "corrupt": [], "code_counts": counts_sparse})
            for name in written:
                written[name].append(columns[name])
        writer.close()
        store.write_marker(unit, results)
    store.finalize(layout, specs)
    return layout, specs, {name: parts for name, parts in written.items()}


def race_setup(model: str):
    """What the store-creation race tests pass to `TokenStore.prepare`: a small layout of four
    input shards and a lineage naming `model` (runs of different models race too)."""
    import hashlib

    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import ArraySpec

    specs = [ArraySpec("codes", (4, 4), "uint16", 64)]
    layout = plan_layout([(f"shard-{i}.tar", "train" if i < 3 else "val", 9) for i in range(4)], 32)
    lineage = {"model_uri": model, "weights_sha256": hashlib.sha256(model.encode()).hexdigest(), "mode": "codes"}
    return lineage, layout, specs


def make_hvae(path: Path) -> Path:
    """An untrained hierarchical VAE with latent groups at 4x4 and 8x8 (2 channels each)."""
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.hvae import HierarchicalVAE, HVAEConfig

    torch.manual_seed(0)
    config = HVAEConfig(image_size=IMAGE_SIZE, channels=1, width=8, latent_channels=2, resolutions=(8, 4))
    return save_model(HierarchicalVAE(config).eval(), path)


def briefly_trained_demo_vqvae(path: Path, steps: int = 40):
    """The demo's VQ-VAE (configs/vqvae_mnist.yaml: 512 codes, 8x8 tokens) trained `steps` steps
    of 32 MNIST digits on one thread, so that its codes spread; returns (saved path, the 500
    val digits uint8 (500, 32, 32, 1))."""
    import torch

    from tokenmill.models.serialization import build_model, save_model
    from tokenmill.pipeline.shards.sources import load_builtin
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.optim import OptimConfig, Part
    from tokenmill.pipeline.training.step import StepRunner, own_loss

    digits = load_builtin("builtin:mnist5k").images  # (5000, 32, 32, 1) uint8; the last 500 are val
    x = torch.from_numpy(digits[:4500]).permute(0, 3, 1, 2).float() / 255
    with one_torch_thread():  # a loaded 2-core machine: one thread is much steadier than two
        torch.manual_seed(0)
        model = build_model(load_train_config(CONFIGS / "vqvae_mnist.yaml").model)
        step = StepRunner({"model": Part("model", model, model, OptimConfig(lr=1e-3, ema_decay=0))}, "fp32",
                          torch.device("cpu"))
        for i in range(steps):
            step.run(own_loss, [(x[torch.randint(0, len(x), (32,))],)], i)
    return save_model(model.eval(), path), digits[4500:]


# `build_latent_store`'s store: 12 + 5 train items, 9 val, two latent groups (C, h, w).
LATENT_COUNTS, LATENT_SPLITS = [12, 5, 9], ["train", "train", "val"]
LATENT_GROUPS = {"latents_2x2": (3, 2, 2), "latents_4x4": (3, 4, 4)}


def build_latent_store(url: str, variants: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A finished store of hierarchical-VAE-like latent groups through the store API alone;
    returns each array in item order (all splits), float16 (N, [V,] ...)."""
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore

    rng = np.random.default_rng(seed)
    lead = (variants,) if variants > 1 else ()
    specs = [ArraySpec(name, lead + shape, "float16") for name, shape in LATENT_GROUPS.items()]
    layout = plan_layout([(f"s{i}.tar", s, n) for i, (n, s) in enumerate(zip(LATENT_COUNTS, LATENT_SPLITS))],
                         max(s.row_bytes for s in specs))
    lineage = {"model_uri": "test", "weights_sha256": "0" * 64, "mode": "latents"}
    if variants > 1:
        lineage["augment"] = {"name": "flip", "variants": variants}
    store = TokenStore(url)
    store.prepare(lineage, layout, specs, overwrite=False)
    written: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for unit in layout.units:
        [shard] = unit.shards
        n = shard.count
        columns = {s.name: rng.normal(size=(n, *s.row_shape)).astype(np.float16) for s in specs}
        writer = store.writer(unit, layout.rows_per_zarr_shard, specs)
        writer.append({**columns, "keys": np.array([f"k{shard.index}-{j}" for j in range(n)], dtype=object),
                       "labels": np.arange(n, dtype=np.int64) % 4})
        rows = writer.close()
        store.write_marker(unit, [{"rows": rows[0], "corrupt": [], "code_counts": {}}])
        for name in written:
            written[name].append(columns[name])
    store.finalize(layout, specs)
    return {name: np.concatenate(parts) for name, parts in written.items()}


def write_encoded_store(url: str, encoder, lineage: dict, rows: dict[str, np.ndarray]) -> None:
    """A finished one-shard store of `rows` (what `encoder.encode` returned for n images, keys k0…,
    labels 0) with `lineage`, through the store API (no Ray): what `tokenize` writes for them."""
    from tokenmill.pipeline.tokens import store_code_stats
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import TokenStore

    n = len(next(iter(rows.values())))
    layout = plan_layout([("shard-0.tar", "train", n)], max(s.row_bytes for s in encoder.specs))
    store = TokenStore(url)
    store.prepare(lineage, layout, encoder.specs, overwrite=False)
    (unit,) = layout.units
    writer = store.writer(unit, layout.rows_per_zarr_shard, encoder.specs)
    writer.append({**rows, "keys": np.array([f"k{i}" for i in range(n)], dtype=object),
                   "labels": np.zeros(n, dtype=np.int64)})
    counts = {s.name: store_code_stats.to_sparse(store_code_stats.count_codes(rows[s.name], s.codebook_size))
              for s in encoder.specs}
    results = [{"rows": writer.end_shard(), "corrupt": [], "code_counts": counts}]
    writer.close()
    store.write_marker(unit, results)
    store.finalize(layout, encoder.specs)


def decoded_through_lineage(ref: str, images: np.ndarray, url: str):
    """`images` (uint8 (n, H, W, C)) tokenized by model `ref` into a one-shard store at `url`, then
    decoded by the model the store's lineage names (resolved again, sha-checked): (n, C, H, W) in [0, 1]."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.detokenize import StoreDecoder
    from tokenmill.pipeline.tokens.encoder import TokenEncoder
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, tokenizer_lineage

    files = resolve_model(ref)
    encoder = TokenEncoder(files, latents=False)
    rows = encoder.encode(images, np.zeros(len(images), dtype=np.int64))
    write_encoded_store(url, encoder, tokenizer_lineage(files, encoder, ExtractionOptions.build()), rows)
    return next(StoreDecoder(url).images(0, len(images)))
