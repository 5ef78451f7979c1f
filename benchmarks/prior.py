"""`tokenmill bench prior`: the whole loop images -> tokens -> prior -> images on MNIST-5k, in one run.

1. Train the demo's VQ-VAE (configs/vqvae_mnist.yaml's model) briefly with the training engine's
   step in this process, shard MNIST-5k and tokenize every shard into a Zarr token store in-process (the
   store's own region writer, `encode_unit`, markers and finalize; no Ray).
2. Train a small CNN classifier on the MNIST-5k train split (`classifier_val_accuracy`, must be
   >= 0.97 for the class accuracy to mean anything).
3. Train a class-conditional Transformer prior on the store's train split. Training steps
   rotate, in segments, between three data sources feeding the same loop: in-memory tensors,
   `TokenDataset` resident path and `TokenDataset` chunk-cache path (forced with a tiny
   `cache_bytes`), both through a DataLoader with workers. `data_ratio_*` = steps/s of a store
   source / steps/s of the in-memory source (the first round of segments is warm-up). `--s3` adds
   a fourth source: the store copied to a loopback S3 server (moto) and read by train-prior's own
   data path (`TrainBatches`: chunk-level shuffle, read-ahead thread, concurrent chunk fetches,
   the node's chunk folder), with the rank's chunk cache and the node folder both smaller than
   the split (`data_ratio_s3`).
4. `val_bits_per_token` (prior cross-entropy on the store's val split) against the store's
   unigram code entropy (`bits_ratio`); `class_accuracy` of 100 CFG samples per class decoded by
   the tokenizer and classified; `fid_classifier`: Fréchet distance in the classifier's
   feature space to the real val digits, next to the tokenizer's reconstructions of train
   digits (floor) and decodes of uniformly random codes (ceiling); `kv_speedup`: tokens/s of
   KV-cache sampling / recomputing the whole prefix every step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqvae_mnist.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, output_path, positive_int

    parser = subparsers.add_parser("prior", help="train a prior on an MNIST-5k token store; data, bits, samples, KV",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prior_options(parser)
    parser.add_argument("--segment", type=positive_int, default=10, help="steps per data-source segment")
    parser.add_argument("--kv-rows", type=positive_int, default=32, help="rows sampled for kv_speedup")
    parser.add_argument("--workers", type=positive_int, default=2, help="DataLoader workers of the store sources")
    parser.add_argument("--s3", action="store_true", help="also feed steps from the store on a loopback S3 server "
                        "through train-prior's data path, caches smaller than the store (data_ratio_s3)")
    parser.add_argument("--grid", type=output_path(folder=False), default=None, help="also write a 10 x 10 sample grid PNG here")
    add_json_option(parser)
    parser.set_defaults(run=run)


def add_prior_options(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark shares with `tokenmill bench prior-families`: tokenizer, judge,
    prior size and training, samples, threads, device, workdir."""
    from tokenmill.jobs.cli import (
        fraction,
        nonnegative_float,
        nonnegative_int,
        output_folder,
        positive_float,
        positive_int,
    )

    parser.add_argument("--steps", type=positive_int, default=1600, help="prior training steps (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--dim", type=positive_int, default=96)
    parser.add_argument("--depth", type=positive_int, default=4)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--dropout", type=fraction, default=0.1, help="prior residual/attention dropout "
                        "(default %(default)s: without it this prior overfits MNIST-5k and its samples score lower)")
    parser.add_argument("--label-dropout", type=fraction, default=0.1, help="share of rows trained with the "
                        "null class, for class-free guidance (default %(default)s)")
    parser.add_argument("--vq-steps", type=positive_int, default=300, help="tokenizer training steps")
    parser.add_argument("--classifier-epochs", type=positive_int, default=8)
    parser.add_argument("--per-class", type=positive_int, default=100, help="samples per class")
    parser.add_argument("--cfg", type=nonnegative_float, default=3.0, help="class-free guidance scale of the samples")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default="auto", help="where the prior trains and samples: auto (CUDA when "
                        "present), cpu or cuda[:N]; the tokenizer and the judge train on the CPU")
    parser.add_argument("--workdir", type=output_folder, default=None, help="where shards, store, models go")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return benchmark(args.workdir, args)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-prior-") as tmp:
        return benchmark(Path(tmp), args)


def benchmark(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tokenmill.models.prior import PriorConfig, TransformerPrior
    from tokenmill.pipeline.prior.sampling import resolve_device
    from tokenmill.pipeline.shards.synthetic import mnist_tensors

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    stages = Stages()
    result: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k not in ("run", "json", "command", "benchmark")}}
    with stages("tokenizer"):
        tokenizer, tok_dir = train_tokenizer(root / "tokenizer", args)
    with stages("tokenize"):
        store_url = tokenize_in_process(tok_dir, root)
    with stages("classifier"):
        classifier, result["classifier_val_accuracy"] = train_classifier(args)
    prior = TransformerPrior(PriorConfig(codebook_size=tokenizer.codebook_size, num_classes=10, grid=[[8, 8]],
                                         dim=args.dim, depth=args.depth, heads=args.heads,
                                         dropout=args.dropout, label_dropout=args.label_dropout))
    device = resolve_device(args.device)
    result["device"] = str(device)
    prior.to(device)
    with stages("prior"):
        result |= train_prior(prior, store_url, args, SOURCES + (("s3",) if getattr(args, "s3", False) else ()))
    with stages("evaluate"):
        result |= bits_per_token(prior, store_url)
        result |= sample_quality(prior, tokenizer, classifier, mnist_tensors("val"), args)
        result |= kv_speedup(prior, args.kv_rows)
    result["stage_seconds"] = stages.seconds
    result["seconds"] = time.perf_counter() - started
    _print_table(result)
    return result


class Stages:
    """`with stages(name):` prints the stage and records its wall-clock seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        import contextlib
        import sys

        @contextlib.contextmanager
        def timed():
            print(f"[bench prior] {name} ...", file=sys.stderr, flush=True)
            begun = time.perf_counter()
            yield
            self.seconds[name] = round(time.perf_counter() - begun, 1)

        return timed()


# -- 1. tokenizer and token store --------------------------------------------------------------
def train_tokenizer(path: Path, args: argparse.Namespace, overrides: tuple[str, ...] = ()):
    """The demo's VQ-VAE (with `--set`-style `overrides` of its config, e.g. another quantizer)
    trained `args.vq_steps` steps of 64 on MNIST-5k train; saves its EMA weights."""
    import dataclasses

    import torch

    from tokenmill.models import save_model
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.shards.synthetic import mnist_tensors
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.optim import Part
    from tokenmill.pipeline.training.step import StepRunner, own_loss

    config = load_train_config(DEFAULT_CONFIG, list(overrides))
    model = build_model(config.model)
    part = Part("model", model, model, dataclasses.replace(config.optim, total_steps=args.vq_steps))
    runner = StepRunner({"model": part}, "fp32", torch.device("cpu"))
    x, y = mnist_tensors("train")
    generator = torch.Generator().manual_seed(args.seed)
    batch = config.train.batch_size
    for i in range(args.vq_steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        runner.run(own_loss, [(x[index], y[index])], i)
    tokenizer = part.eval_module().eval()
    return tokenizer, save_model(tokenizer, path)


def tokenize_in_process(model_dir: Path, root: Path, name: str = "tokens.zarr") -> str:
    """Shard MNIST-5k into `root/shards` (a rerun finds them complete) and tokenize every shard
    into `root/<name>` in this process."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.shards.writer import write_shards
    from tokenmill.pipeline.tokens import local_tokenize

    shards = str(root / "shards")
    write_shards("builtin:mnist5k", shards, progress=False)
    return local_tokenize.tokenize_in_process(resolve_model(str(model_dir)), shards, str(root / name))


# -- 2. the judge: a small CNN -----------------------------------------------------------------
def _digit_net():
    from torch import nn

    def conv(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                *([nn.MaxPool2d(2)] if pool else [])]

    # (B, 1, 32, 32) -> 16x16 -> 8x8 -> 4x4 -> features (B, 128) -> logits (B, 10)
    features = nn.Sequential(*conv(1, 32, False), *conv(32, 32, True), *conv(32, 64, False), *conv(64, 64, True),
                             *conv(64, 128, True), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2048, 128), nn.ReLU())
    return nn.Sequential(features, nn.Linear(128, 10))


def _jitter(x, generator):
    """Each image (B, 1, H, W) rotated up to ±12°, scaled ±10 % and shifted up to ±2.5 px: the
    usual MNIST augmentation, which lifts this CNN from ~0.95 to ~0.98 on 4,500 digits."""
    import torch
    import torch.nn.functional as F

    n = len(x)
    angle = (torch.rand(n, generator=generator) - 0.5) * 2 * math.radians(12)
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 2 * (2.5 / (x.shape[-1] / 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def train_classifier(args: argparse.Namespace):
    """A CNN trained on MNIST-5k train with random affine jitter; (model, val accuracy)."""
    import torch
    import torch.nn.functional as F

    from tokenmill.pipeline.shards.synthetic import mnist_tensors

    torch.manual_seed(args.seed)
    net = _digit_net()
    x, y = mnist_tensors("train")
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    batch, steps = 128, args.classifier_epochs * (len(x) // 128)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(net(_jitter(x[index], generator)), y[index], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x_val, y_val = mnist_tensors("val")
    predicted, _ = classify(net, x_val)
    return net, float((predicted == y_val).float().mean())


def classify(net, images):
    """images (N, 1, 32, 32) -> predicted classes (N,), features (N, 128) float64."""
    import torch

    with torch.no_grad():
        features = torch.cat([net[0](part) for part in images.split(500)])
        return net[1](features).argmax(1), features.double()


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    import numpy as np
    from scipy import linalg

    a, b = a.numpy(), b.numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


# -- 3. prior training, fed by three sources ---------------------------------------------------
class _WholeBatches:
    """A map-style dataset whose item is a whole batch: `[indices]` -> tokens (B, L) through
    `TokenDataset.batch` (one read per batch). Used with DataLoader(batch_size=None)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        return self.dataset.batch(indices)["tokens"]


def _store_batches(dataset, batch: int, workers: int, seed: int):
    """Endless shuffled (B, L) batches of a TokenDataset through a DataLoader with workers."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(range(len(dataset)), generator=generator), batch, drop_last=True)
    loader = DataLoader(_WholeBatches(dataset), sampler=sampler, batch_size=None, num_workers=workers,
                        persistent_workers=True, prefetch_factor=4)
    while True:
        yield from loader


def _memory_batches(tokens, batch: int, seed: int):
    """Endless shuffled (B, L) batches of an in-memory tensor (the baseline)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(tokens), generator=generator)
        for i in range(0, len(order) - batch + 1, batch):
            yield tokens[order[i : i + batch]]


SOURCES = ("memory", "resident", "streaming")  # and "s3" (`--s3`)


S3_CACHE_CHUNKS, S3_NODE_CHUNKS, S3_WINDOW_CHUNKS = 2, 3, 2  # of the split's ~5 chunks (MNIST-5k train)


def _s3_batches(store_url: str, args: argparse.Namespace, stack, result: dict[str, Any]):
    """Endless (B, L) batches of train-prior's data path (rank 0 of 1) over a copy of the store on
    a loopback S3 server; the rank's chunk cache holds S3_CACHE_CHUNKS chunks, the node folder
    S3_NODE_CHUNKS, both fewer than the split has. Records the sizes in `result`."""
    import itertools

    import numpy as np
    import s3fs

    from tokenmill.benchmarks.harness import loopback_s3
    from tokenmill.pipeline.prior import data as prior_data
    from tokenmill.pipeline.prior.config import PriorDataSection

    MIB = 1 << 20
    options = stack.enter_context(loopback_s3())
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench")
    fs.put(store_url, "bench/tokens.zarr", recursive=True)
    local = prior_data.open_split(PriorDataSection(store=store_url), "train", 10)
    group = local.store.open_group("r")
    codes = group[local.specs[0]["name"]]
    chunk_bytes = codes.chunks[0] * int(np.prod(codes.shape[1:])) * codes.dtype.itemsize  # one slot of the cache
    data = PriorDataSection(store="s3://bench/tokens.zarr", storage_options=options,
                            cache_mb=S3_CACHE_CHUNKS * chunk_bytes / MIB, node_cache_mb=S3_NODE_CHUNKS * chunk_bytes / MIB,
                            node_cache_dir=str(Path(store_url).parent / "node-chunks"),
                            shuffle_window_chunks=S3_WINDOW_CHUNKS)
    dataset = prior_data.open_split(data, "train", 10)
    chunks = len(np.unique(prior_data.item_chunks(dataset, "train")))
    assert not dataset.resident and dataset.node_cache is not None and chunks > S3_NODE_CHUNKS
    result.update(s3_split_chunks=chunks, s3_cache_chunks=S3_CACHE_CHUNKS, s3_node_cache_chunks=S3_NODE_CHUNKS)
    batches = prior_data.TrainBatches(dataset, "train", 0, 1, args.batch_size, args.seed, data.shuffle_window_chunks,
                                      data.prefetch_batches)
    for epoch in itertools.count():
        for _, batch in batches.epoch(epoch):
            yield batch["tokens"]


def train_prior(prior, store_url: str, args: argparse.Namespace, sources: tuple[str, ...] = SOURCES) -> dict[str, Any]:
    """The training engine's step (AdamW, warm-up + cosine, clipping at 1); steps rotate between
    `sources` (of SOURCES) in segments of `args.segment`. Returns steps/s per source (rounds after
    the first; none with one source), the data ratios and the last loss."""
    import torch

    from tokenmill.pipeline.training.optim import OptimConfig, Part
    from tokenmill.pipeline.training.step import StepRunner
    from tokenmill.pipeline.training.tasks.prior import next_token_loss

    stack, extra = contextlib.ExitStack(), {}  # extra: what the S3 source records
    feeds = _feeds(store_url, args, sources, stack, extra)
    segment_steps = args.segment if len(feeds) > 1 else args.steps
    optim = OptimConfig(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01, grad_clip=1.0, ema_decay=0.0,
                        warmup_steps=min(100, args.steps // 10), total_steps=args.steps)
    device = prior.embed.weight.device
    runner = StepRunner({"model": Part("model", prior, prior, optim)}, "fp32", device)
    step_seconds: dict[str, list[float]] = {name: [] for name in feeds}
    for step in range(args.steps):
        segment = step // segment_steps
        name = list(feeds)[segment % len(feeds)]
        begun = time.perf_counter()
        tokens = next(feeds[name]).to(device, non_blocking=True)  # the batch's wait counts
        result = runner.run(lambda batch, _step, parts: iter([next_token_loss(batch, parts)]), [tokens], step)
        if device.type == "cuda":  # the step's time, not its launch
            torch.cuda.synchronize(device)
        if segment >= len(feeds):  # the first round starts the loaders' workers: not timed
            step_seconds[name].append(time.perf_counter() - begun)
    prior.eval()
    for feed in feeds.values():  # the read-ahead thread and the S3 server end here
        feed.close()
    stack.close()
    return {"train_loss": float(result.losses["model"]), **_data_ratios(step_seconds), **extra}


def _feeds(store_url: str, args: argparse.Namespace, sources: tuple[str, ...], stack, extra: dict[str, Any]):
    """name -> endless (B, L) batches, for each of `sources`."""
    from tokenmill.pipeline.tokens.dataset import TokenDataset

    opened = dict(add_bos=True, class_token=True, num_classes=10)
    resident = TokenDataset(store_url, "train", **opened)
    streaming = TokenDataset(store_url, "train", **opened, cache_bytes=16 * 1024)
    assert resident.resident and not streaming.resident
    feeds = {"memory": lambda: _memory_batches(resident.batch(range(len(resident)))["tokens"], args.batch_size,
                                               args.seed),
             "resident": lambda: _store_batches(resident, args.batch_size, args.workers, args.seed),
             "streaming": lambda: _store_batches(streaming, args.batch_size, args.workers, args.seed),
             "s3": lambda: _s3_batches(store_url, args, stack, extra)}
    return {name: feeds[name]() for name in sources}


def _data_ratios(step_seconds: dict[str, list[float]]) -> dict[str, Any]:
    """Steps/s per source from the median step time (robust to the preemptions of a shared
    machine) and from the mean (which a slow reader's occasional stalls would show)."""
    import statistics

    timed = {name: s for name, s in step_seconds.items() if s}
    median = {name: 1 / statistics.median(s) for name, s in timed.items()}
    mean = {name: len(s) / sum(s) for name, s in timed.items()}
    out: dict[str, Any] = {"steps_per_s_median": median, "steps_per_s_mean": mean}
    for name in ("resident", "streaming", "s3"):
        ok = name in timed and "memory" in timed
        out[f"data_ratio_{name}"] = median[name] / median["memory"] if ok else None
        out[f"data_ratio_{name}_mean"] = mean[name] / mean["memory"] if ok else None
    return out


# -- 4. evaluation -----------------------------------------------------------------------------
def bits_per_token(prior, store_url: str) -> dict[str, Any]:
    """Prior cross-entropy on the val split (bits per code, the training validation's own code)
    vs the store's unigram code entropy (over every level's codes: a multi-scale store's scales
    share one codebook)."""
    import numpy as np

    from tokenmill.pipeline.prior import validation
    from tokenmill.pipeline.tokens.dataset import TokenDataset
    from tokenmill.pipeline.tokens.store import TokenStore

    val = TokenDataset(store_url, "val", add_bos=True, class_token=True, num_classes=10)
    batches = (val.batch(range(start, min(start + 250, len(val)))) for start in range(0, len(val), 250))
    val_bits = validation.bits_per_token(prior, batches, prior.embed.weight.device)
    group = TokenStore(store_url).open_group("r")  # one codebook_counts array per level: summed (one codebook)
    counts = sum(group[name][:].astype(np.float64) for name in group.keys() if name.startswith("codebook_counts"))
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log2(p)).sum())
    return {"val_bits_per_token": val_bits, "unigram_bits_per_token": unigram, "bits_ratio": val_bits / unigram,
            "codes_used": int((counts > 0).sum())}


def sample_quality(prior, tokenizer, classifier, val, args: argparse.Namespace) -> dict[str, Any]:
    """Class accuracy and classifier-space Fréchet distances of CFG samples, reconstructions and
    random codes, against the real val digits; writes the sample grid if asked."""
    import torch

    from tokenmill.pipeline.grids import save_png_grid
    from tokenmill.pipeline.prior.sampling import SampleOptions, codes_to_images, draw_codes
    from tokenmill.pipeline.shards.synthetic import mnist_tensors

    x_val, y_val = val
    labels = torch.arange(10).repeat_interleave(args.per_class)
    begun = time.perf_counter()
    codes = draw_codes(prior, labels, SampleOptions(cfg_scale=args.cfg, seed=args.seed, batch_size=500),
                       prior.embed.weight.device).cpu()  # the tokenizer decodes on the CPU
    sample_s = time.perf_counter() - begun
    samples = codes_to_images(tokenizer, codes, prior.config.grid)
    predicted, sample_features = classify(classifier, samples)
    x_train, y_train = mnist_tensors("train")  # sorted by class: take a random subset
    subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(2))[: len(samples)]
    x_train, y_train = x_train[subset], y_train[subset]
    with torch.no_grad():
        recon = torch.cat([tokenizer.decode(tokenizer.encode(part)) for part in x_train.split(500)])
    random_codes = torch.randint(0, prior.config.codebook_size, codes.shape, generator=torch.Generator().manual_seed(1))
    real = classify(classifier, x_val)[1]
    recon_predicted, recon_features = classify(classifier, recon)
    if args.grid is not None:
        shown = min(10, args.per_class)
        first = torch.cat([torch.arange(c * args.per_class, c * args.per_class + shown) for c in range(10)])
        save_png_grid(samples[first], args.grid, nrow=shown)
    return {
        "class_accuracy": float((predicted == labels).float().mean()),
        "recon_class_accuracy": float((recon_predicted == y_train[: len(recon)]).float().mean()),
        "fid_classifier": frechet_distance(sample_features, real),
        "fid_classifier_recon_floor": frechet_distance(recon_features, real),
        "fid_classifier_random_codes": frechet_distance(
            classify(classifier, codes_to_images(tokenizer, random_codes, prior.config.grid))[1], real),
        "samples": len(samples), "sample_tokens_per_s_cfg": codes.numel() / sample_s,
        "samples_per_s_cfg": len(samples) / sample_s,
    }


def kv_speedup(prior, rows: int) -> dict[str, Any]:
    """Tokens/s of KV-cache sampling vs recomputing the prefix each step (cached runs before
    and after the uncached one, averaged)."""
    import torch

    device = prior.embed.weight.device
    labels = torch.arange(rows) % 10
    rates = {}
    for name, cached in (("cached_before", True), ("recompute", False), ("cached_after", True)):
        begun = time.perf_counter()
        codes = prior.sample(rows, labels, use_cache=cached, generator=torch.Generator(device=device).manual_seed(0)).cpu()
        rates[name] = codes.numel() / (time.perf_counter() - begun)
    cached = (rates["cached_before"] + rates["cached_after"]) / 2
    return {"kv_tokens_per_s": cached, "recompute_tokens_per_s": rates["recompute"],
            "kv_speedup": cached / rates["recompute"]}


def _print_table(result: dict[str, Any]) -> None:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    rows = [
        ("data_ratio_resident", ">= 0.95"), ("data_ratio_streaming", ">= 0.95"), ("data_ratio_s3", ">= 0.95"),
        ("val_bits_per_token", ""), ("unigram_bits_per_token", ""), ("bits_ratio", "<= 0.75"),
        ("classifier_val_accuracy", ">= 0.97"), ("class_accuracy", ">= 0.9"), ("recon_class_accuracy", ""),
        ("fid_classifier", ""), ("fid_classifier_recon_floor", "floor"), ("fid_classifier_random_codes", "ceiling"),
        ("kv_speedup", ">= 3"), ("seconds", ""),
    ]
    for key, target in rows:
        print(f"{key:<30}{fmt(result.get(key)):>10}  {target}")
