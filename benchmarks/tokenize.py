"""`tokenmill bench tokenize`: shards -> token store throughput against two baselines, in one run.

- `pipeline_img_s`: `tokenize_dataset` end to end on N 32x32 RGB images: the job's own actor
  processes starting (importing Ray Data and torch, loading the model), reading, decoding,
  encoding, Zarr writes, markers and finalize all included. Ray is already up, as on any
  cluster: that includes Ray Data's cluster-wide helper actors (stats, autoscaling coordinator,
  actor-location tracker), detached actors that a cluster's first Ray Data job starts (the
  training job, usually) and every later job shares. A separate driver starts them first, so
  the timed job cannot reuse its worker processes; `ray_data_services_s` is what that costs.
- `limit_img_s`: the same encoder's forward + nearest code on in-memory tensors at the same
  batch size, on every CPU (the compute limit): the faster of one process with every thread
  and `actors` processes side by side (the pipeline's split of the cores), averaged from
  measurements right before and right after the pipeline run, with the Ray instance up as the
  run has it (its idle daemons take ~3% of 2 cores); `efficiency = pipeline / limit`
  (`efficiency_vs_best_limit` divides by the fastest limit seen in the whole benchmark instead).
- `naive_img_s`: one process, webdataset -> decode -> model -> numpy; `vs_naive = pipeline / naive`.
- `scale_ratio`: seconds for 4N images / seconds for N (ideal 4); peak RSS of driver + actors
  for both runs (flat memory: it should not grow with N).
- `startup_s`: from the call until the first shard began (the job's actor processes starting,
  importing Ray Data and torch, loading the model): a fixed cost per job. `steady_img_s` is
  the rate after it, `steady_efficiency = steady / limit`.
- `read_ratio`: TokenDataset random batches of 256 vs np.memmap of the same codes (batches/s
  from the median batch time, readers interleaved); `read_ratio_chunk_cache` for the LRU path.
The model is an untrained VQ-VAE of realistic size (speed does not depend on training).

`--kl-vs-fastdit` instead: precomputing `AutoencoderKL` latents with tokenmill against fast-DiT's
`extract_features.py` loop (`benchmarks.peers.fastdit_extract`), on the same N 32x32 RGB images.
- tokenmill: `tokenize --model diffusers:KL --latents sample` from PNG shards into one Zarr store
  (actors start, read, decode, encode, write, markers, finalize all timed).
- fast-DiT-style baseline: an ImageFolder-like dataset of the same images as PNG files, a
  DataLoader (1 worker process, the same batch size), `encode(x).latent_dist.sample() * scale`,
  then one `np.save` per sample for its latents and one for its label, as fast-DiT writes them.
Reported: img/s of both, their ratio, and the number of files each wrote. The model is a tiny
randomly initialised AutoencoderKL (speed does not depend on training).

`--llamagen-vs-extract` instead: `tokenize --model llamagen:…` against LlamaGen's
`extract_codes_c2i.py` loop, codes asserted equal (`benchmarks.tokenize_llamagen`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

TINY_KL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=0.18215)


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, output_folder, positive_int
    from tokenmill.pipeline.tokenize.options import PRECISIONS, cli_type

    parser = subparsers.add_parser("tokenize", help="tokenize throughput vs compute limit and a naive loop",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=100_000, help="N (default %(default)s); the scale run uses 4N")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--actors", type=positive_int, default=None, help="encoding actors (default: one per CPU)")
    parser.add_argument("--gpus", type=cli_type("gpus"), default=None, help="tokenize --gpus (default: GPUs if the cluster has any)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="tokenize --precision")
    parser.add_argument("--decode-threads", type=positive_int, default=None, help="tokenize --decode-threads")
    parser.add_argument("--workdir", type=output_folder, default=None, help="where shards and stores go (default: a temp dir)")
    parser.add_argument("--kl-vs-fastdit", action="store_true",
                        help="instead: a tiny diffusers AutoencoderKL through tokenmill vs fast-DiT's extraction loop "
                        "(benchmarks.peers.fastdit_extract)")
    parser.add_argument("--llamagen-vs-extract", action="store_true",
                        help="instead: tokenize --model llamagen:… --augment flip vs LlamaGen's extract_codes_c2i.py "
                        "loop (benchmarks.tokenize_llamagen)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = dict(gpus=args.gpus, precision=args.precision, decode_threads=args.decode_threads)
    if args.kl_vs_fastdit:
        chosen, device = benchmark_kl, {}
    elif args.llamagen_vs_extract:
        from tokenmill.benchmarks.tokenize_llamagen import benchmark_llamagen

        chosen, device = benchmark_llamagen, {}
    else:
        chosen = benchmark
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return chosen(args.workdir, args.images, args.batch_size, args.actors, **device)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-") as tmp:
        return chosen(Path(tmp), args.images, args.batch_size, args.actors, **device)


def _timed_run(run, count: int, limit, limits: list[float]) -> dict[str, Any]:
    """Time one tokenize run (`run()` -> TokenizeSummary) of `count` images with its peak RSS, then
    measure the compute limit again; efficiency is against the limits right before and after."""
    from tokenmill.benchmarks.harness import PeakRSS

    with PeakRSS() as peak:
        started = time.perf_counter()
        summary = run()
        seconds = time.perf_counter() - started
    assert summary.samples == count, summary
    limits.append(limit())
    around = (limits[-2] + limits[-1]) / 2
    return {"seconds": seconds, "img_s": count / seconds, "peak_rss_mb": peak.total_mb, "limit_img_s": around,
            "efficiency": count / seconds / around, "startup_s": summary.startup_s,
            "steady_img_s": count / (seconds - summary.startup_s)}


def benchmark(root: Path, n: int, batch_size: int, actors: int | None, gpus: int | None = None,
              precision: str = "fp32", decode_threads: int | None = None) -> dict[str, Any]:
    import torch

    from tokenmill.benchmarks.harness import make_bench_tokenizer
    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.synthetic import smooth_images, write_image_shards
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    cpus = os.cpu_count() or 1
    on_gpu = bool(gpus if gpus is not None else torch.cuda.is_available())
    actors = actors or (torch.cuda.device_count() if on_gpu else cpus)
    model = make_bench_tokenizer(root / "model")
    small, large = (write_image_shards(smooth_images(count, seed=count, noise=True), root, name)
                    for name, count in (("small", n), ("large", 4 * n)))

    # The machine's speed drifts (shared hosts: up to 2x over minutes), so every run is compared
    # with the compute limit measured right before and right after it, in the same conditions:
    # the naive loop without Ray, the pipeline runs with the Ray instance up.
    with ComputeLimit(model, batch_size, min(n, 8192), cpus, actors, "cuda" if on_gpu else "cpu", precision) as limit:
        limits = [limit()]
        naive = _naive_img_s(model, small, batch_size, cpus)
        limits.append(limit())
        ensure_ray()
        services = _start_ray_data_services()
        limits.append(limit())
        runs = {}
        options = TokenizeOptions(batch_size=batch_size, actors=actors, overwrite=True, gpus=gpus, precision=precision,
                                  decode_threads=decode_threads)
        for name, shards, count in (("small", small, n), ("large", large, 4 * n)):
            runs[name] = _timed_run(lambda shards=shards, name=name: tokenize_dataset(
                str(model), shards, str(root / f"{name}.zarr"), options), count, limit, limits)
    read = _read_ratio(root / "small.zarr")
    pipeline, limit_small = runs["small"]["img_s"], runs["small"]["limit_img_s"]
    result = {
        "images": n, "batch_size": batch_size, "actors": actors, "cpus": cpus, "device": limit.device,
        "precision": precision, "decode_threads": decode_threads,
        "limit_one_process_img_s": limit.one_process, "limit_side_by_side_img_s": limit.side_by_side,
        "pipeline_img_s": pipeline, "limit_img_s": limit_small, "efficiency": pipeline / limit_small,
        "limit_samples_img_s": limits, "efficiency_vs_best_limit": pipeline / max(limits),
        "naive_img_s": naive, "naive_limit_img_s": (limits[0] + limits[1]) / 2,
        "vs_naive": pipeline / naive,
        "startup_s": runs["small"]["startup_s"], "steady_img_s": runs["small"]["steady_img_s"],
        "steady_efficiency": runs["small"]["steady_img_s"] / limit_small,
        "scale_ratio": runs["large"]["seconds"] / runs["small"]["seconds"],
        "peak_rss_mb": {"n": runs["small"]["peak_rss_mb"], "4n": runs["large"]["peak_rss_mb"]},
        "memory_ratio": runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"],
        "ray_data_services_s": services, "runs": runs, **read,
    }
    torch.set_num_threads(cpus)
    print("  ".join(f"{k}={result[k]:.3g}" for k in (
        "pipeline_img_s", "limit_img_s", "efficiency", "naive_img_s", "vs_naive", "startup_s", "steady_img_s",
        "steady_efficiency", "scale_ratio", "memory_ratio", "read_ratio")))
    return result


def benchmark_kl(root: Path, n: int, batch_size: int, actors: int | None) -> dict[str, Any]:
    """`--kl-vs-fastdit`: tokenmill's latents of a tiny AutoencoderKL vs fast-DiT's loop (module docstring)."""
    import torch
    from PIL import Image

    from tokenmill.benchmarks.peers import fastdit_extract
    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.synthetic import smooth_images, write_image_shards
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.diffusers_adapter import import_diffusers

    torch.manual_seed(0)
    model_dir = root / "kl"
    import_diffusers().AutoencoderKL(**TINY_KL).eval().save_pretrained(model_dir)
    images = smooth_images(n, seed=n, noise=True)
    shards = write_image_shards(images, root, "kl")
    folder = root / "imagefolder" / "0"  # ImageFolder layout: one class folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:07d}.png")

    baseline = fastdit_extract(model_dir, folder, root / "features", batch_size)
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


class ComputeLimit:
    """`limit()` -> img/s of the encoder's forward + nearest code on in-memory tensors at the
    pipeline's batch size: the faster of one process with `cpus` threads and `actors` processes
    side by side with cpus // actors threads each (how the pipeline splits the cores; on CPUs
    it is often the faster). Every measurement of both is kept."""

    def __init__(self, model_dir: Path, batch_size: int, n: int, cpus: int, actors: int, device: str = "cpu",
                 precision: str = "fp32"):
        self.model_dir, self.batch_size, self.n, self.cpus, self.actors = model_dir, batch_size, n, cpus, actors
        self.device, self.precision = device, precision  # on a GPU: one process, the job's autocast
        self.one_process: list[float] = []
        self.side_by_side: list[float] = []

    def __enter__(self) -> "ComputeLimit":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from tokenmill.models import load_model

        self.model = load_model(self.model_dir, map_location=self.device).eval()
        if self.device != "cpu":
            self.pool = None
            return self
        self.pool = ProcessPoolExecutor(self.actors, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_load_limit_model,
                                        initargs=(str(self.model_dir), max(1, self.cpus // self.actors)))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __call__(self) -> float:
        import torch

        torch.set_num_threads(self.cpus)
        started, ended = _encode_span(self.model, self.batch_size, self.n, self.device, self.precision)
        self.one_process.append(self.n / (ended - started))
        if self.pool is None:  # GPU: the device is the limit
            return self.one_process[-1]
        per_process = self.n // self.actors
        spans = list(self.pool.map(_timed_encode, [self.batch_size] * self.actors, [per_process] * self.actors))
        # From the first start to the last end: any skew between the processes counts against it.
        self.side_by_side.append(per_process * self.actors / (max(e for _, e in spans) - min(s for s, _ in spans)))
        return max(self.one_process[-1], self.side_by_side[-1])


_LIMIT_MODEL = None  # the model of a ComputeLimit worker process


def _load_limit_model(model_dir: str, threads: int) -> None:
    import torch

    from tokenmill.models import load_model

    global _LIMIT_MODEL
    torch.set_num_threads(threads)
    _LIMIT_MODEL = load_model(model_dir).eval()


def _timed_encode(batch_size: int, n: int) -> tuple[float, float]:
    """In a ComputeLimit worker: see `_encode_span`."""
    return _encode_span(_LIMIT_MODEL, batch_size, n)


def _encode_span(model, batch_size: int, n: int, device: str = "cpu", precision: str = "fp32") -> tuple[float, float]:
    """(start, end) wall-clock times of encoding n in-memory 32x32 images in batches (on
    `device`, already there: the compute alone; under the job's autocast)."""
    import torch

    from tokenmill.pipeline.training.precision import autocast

    x = torch.rand(n, 3, 32, 32, device=device)
    with torch.inference_mode(), autocast(precision, torch.device(device)):
        model.encode(x[:batch_size])  # warm-up
        started = time.time()
        for i in range(0, n, batch_size):
            model.encode(x[i : i + batch_size]).cpu().numpy()
    return started, time.time()


def _start_ray_data_services() -> float:
    """Run a one-actor Ray Data job from another driver process on this Ray instance, which
    starts Ray Data's detached helper actors; returns its seconds. (Worker processes belong to
    the driver's job, so none of this one's can serve the timed job.)"""
    import subprocess
    import sys

    import ray

    script = (
        "import ray\n"
        "ray.init(address=%r)\n"
        "class Same:\n"
        "    def __call__(self, batch):\n"
        "        return batch\n"
        "ray.data.range(2).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1)).materialize()\n"
    ) % ray.get_runtime_context().gcs_address
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"starting Ray Data's helper actors failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def _naive_img_s(model_dir: Path, shards: str, batch_size: int, threads: int) -> float:
    """The obvious single-process loop: webdataset -> decode -> batches -> encode -> numpy."""
    import numpy as np
    import torch
    import webdataset as wds

    from tokenmill.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir).eval()
    urls = sorted(str(p) for p in Path(shards).glob("*.tar"))
    started = time.perf_counter()
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("png").batched(batch_size)
    codes = []
    with torch.inference_mode():
        for (images,) in dataset:
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
            codes.append(model.encode(x).numpy().astype(np.uint16))
    count = sum(len(c) for c in codes)
    return count / (time.perf_counter() - started)


def _read_ratio(store: Path, batch: int = 256, batches: int = 400) -> dict[str, float]:
    """TokenDataset vs np.memmap of the same codes: random batches of `batch` items/s."""
    import numpy as np
    import torch

    from tokenmill.pipeline.tokens.dataset import TokenDataset

    dataset = TokenDataset(str(store), split=None)
    codes = np.concatenate([dataset.batch(np.arange(i, min(i + 4096, len(dataset))))["tokens"].numpy()
                            for i in range(0, len(dataset), 4096)]).astype(np.uint16)
    path = store.parent / "codes.npy"
    np.save(path, codes)
    memmap = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(0)
    index = [rng.integers(0, len(dataset), batch) for _ in range(batches)]

    fresh = TokenDataset(str(store), split=None)
    # The LRU chunk path (what datasets larger than `cache_bytes` use), with room for every chunk.
    chunked = TokenDataset(str(store), split=None, cache_bytes=8 * codes.nbytes)
    chunked.resident = False
    readers = {
        "read": lambda idx: fresh.batch(idx)["tokens"],
        "read_chunked": lambda idx: chunked.batch(idx)["tokens"],
        "memmap": lambda idx: torch.from_numpy(memmap[idx].astype(np.int64)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in readers}
    for i, idx in enumerate(index):
        # Interleaved per batch, so load changes on a shared machine hit all readers alike;
        # the first 20 batches only warm the caches (page cache, chunk cache, resident array).
        for name, fetch in readers.items():
            started = time.perf_counter()
            fetch(idx)
            if i >= 20:
                seconds[name].append(time.perf_counter() - started)
    # Median batch time: robust to the preemptions a shared 2-core machine inflicts on 50 µs reads.
    rate = {name: 1.0 / float(np.median(s)) for name, s in seconds.items()}
    return {"read_batches_s": rate["read"], "read_chunked_batches_s": rate["read_chunked"],
            "memmap_batches_s": rate["memmap"], "read_ratio": rate["read"] / rate["memmap"],
            "read_ratio_chunk_cache": rate["read_chunked"] / rate["memmap"]}
