"""`tokenmill bench scale`: the pipeline at a million images (a measurement run, not a test).

Generated 32x32 RGB images (N, default 1,000,000) are sharded and tokenized in one run:
- shard writing: `tokenmill shard` of N/4 images with one writer, then with `--workers`
  writers (default: the cores), img/s each and their ratio; the N/4 and N shard sets the
  tokenize runs read are written by the parallel writers;
- tokenize at N/4 and at N (the bench-tokenize model: 32x32 -> 8x8 codes of 512): seconds,
  `scale_ratio` = t(N) / t(N/4) (target <= 4.2), peak RSS of the driver and of each encoding
  actor at both sizes (flat: memory must not grow with N), the store's object count, and the
  finalize step (the driver merging markers) as a share of the run (target <= 5%);
- the objects a finished store of 10^9 samples in img2dataset's 10,000-sample shards would
  hold, from the real layout (`pipeline.tokens.layout.plan_layout`) and store nodes
  (`pipeline.tokens.store_nodes.store_objects`), target <= 100k.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, nonnegative_int, output_folder, positive_int

    parser = subparsers.add_parser("scale", help="shard and tokenize N (1M) images: throughput, memory, objects",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=positive_int, default=1_000_000, help="N (default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=None, help="parallel shard writers (default: cores)")
    parser.add_argument("--maxcount", type=positive_int, default=10_000, help="samples per shard (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--rss-shards", type=nonnegative_int, default=30,
                        help="then encode this many of the N run's input shards in turn in one process (an "
                             "actor's loop without Ray) and record its RSS after each (0: skip; default %(default)s)")
    parser.add_argument("--px256", type=nonnegative_int, default=2048,
                        help="also tokenize this many 256x256 JPEGs in img2dataset shards with the x16 debug "
                             "model: img/s and actor peak RSS (0: skip; default %(default)s)")
    parser.add_argument("--only-256", action="store_true", help="run the 256-px measurement alone")
    parser.add_argument("--workdir", type=output_folder, default=None, help="where data goes (default: a temp dir)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="tokenmill-scale-") as tmp:
        root = Path(tmp) if args.workdir is None else args.workdir
        root.mkdir(parents=True, exist_ok=True)
        result = {} if args.only_256 else benchmark(root, args.images, workers, args.maxcount, args.batch_size)
        if args.rss_shards > 0 and not args.only_256:
            result["rss_curve_mb"] = rss_curve(root / "model", root / "shards-n", args.rss_shards, args.batch_size)
        if args.px256 > 0:
            result["px256"] = tokenize_256(root / "px256", args.px256, batch_size=64)
        return result


def tokenize_256(root: Path, n: int, batch_size: int) -> dict[str, Any]:
    """img2dataset-layout shards of `n` 256x256 photo-like JPEGs (512 per shard) tokenized with
    configs/debug_vqvae_f16.yaml's x16 model (untrained: speed does not depend on training)."""
    import torch

    from tokenmill.models.serialization import build_model, save_model
    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.synthetic import photo_like_images, write_img2dataset_shards
    from tokenmill.pipeline.training.config import load_train_config

    config = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "debug_vqvae_f16.yaml")
    for start in range(0, n, 512):
        write_img2dataset_shards(photo_like_images(min(512, n - start), size=256, seed=start), root / "shards",
                                 per_shard=512, first_shard=start // 512)
    torch.manual_seed(0)
    model = build_model(config.model)
    model.train()(torch.from_numpy(photo_like_images(64, seed=10**6)).permute(0, 3, 1, 2).float() / 255)
    save_model(model.eval(), root / "model", extra={"transform": config.data.transform.for_eval().model_dump()})
    ensure_ray()
    run = _tokenize(root / "model", root / "shards", root / "tokens.zarr", batch_size)
    line = (f"256 px, x16 model: {run['images']} images, {run['img_s']:.1f} img/s end to end "
            f"(start-up {run['startup_s']:.1f} s), actor peak RSS {[round(x) for x in run['actor_peak_rss_mb']]} MiB "
            f"at batch {batch_size}")
    print(line)
    return dict(run, batch_size=batch_size, line=line)


def benchmark(root: Path, n: int, workers: int, maxcount: int, batch_size: int) -> dict[str, Any]:
    import numpy as np

    from tokenmill.benchmarks.harness import make_bench_tokenizer
    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.synthetic import smooth_images

    quarter = max(1, n // 4)
    source = root / "images.npy"
    np.save(source, np.concatenate([smooth_images(min(65_536, n - i), seed=i, noise=True)
                                    for i in range(0, n, 65_536)]))
    quarter_source = root / "images-quarter.npy"
    np.save(quarter_source, np.load(source, mmap_mode="r")[:quarter])
    ensure_ray()
    result: dict[str, Any] = {"images": n, "quarter": quarter, "workers": workers, "maxcount": maxcount}
    result["shard"] = {
        "one_writer": _shard(str(quarter_source), root / "shards-q1", maxcount, 1),
        "parallel": _shard(str(quarter_source), root / "shards-q", maxcount, workers),
    }
    result["shard"]["speedup"] = result["shard"]["parallel"]["img_s"] / result["shard"]["one_writer"]["img_s"]
    result["shard"]["full"] = _shard(str(source), root / "shards-n", maxcount, workers)
    model = make_bench_tokenizer(root / "model")
    runs = {name: _tokenize(model, root / shards, root / f"{name}.zarr", batch_size)
            for name, shards in (("quarter", "shards-q"), ("n", "shards-n"))}
    result["tokenize"] = runs
    result["scale_ratio"] = runs["n"]["seconds"] / runs["quarter"]["seconds"]
    result["size_ratio"] = n / quarter
    result["finalize_share"] = runs["n"]["finalize_s"] / runs["n"]["seconds"]
    result["billion"] = objects_for(10**9, 10_000, runs["n"]["arrays"])
    _print(result)
    return result


def _shard(src: str, dest: Path, maxcount: int, workers: int) -> dict[str, Any]:
    from tokenmill.pipeline.shards.parallel_writer import write_shards_parallel
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    settings = ShardSettings(maxcount=maxcount, val_fraction=0.0)
    started = time.perf_counter()
    if workers > 1:
        summary = write_shards_parallel(src, str(dest), settings, None, workers, progress=False)
    else:
        summary = write_shards(src, str(dest), settings, progress=False)
    seconds = time.perf_counter() - started
    return {"workers": workers, "images": summary["samples"], "shards": summary["shards"], "seconds": seconds,
            "img_s": summary["samples"] / seconds}


def _tokenize(model: Path, shards: Path, store: Path, batch_size: int) -> dict[str, Any]:
    from tokenmill.benchmarks.harness import PeakRSS
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.store import TokenStore

    with PeakRSS() as peak:
        started = time.perf_counter()
        summary = tokenize_dataset(str(model), str(shards), str(store),
                                   TokenizeOptions(batch_size=batch_size, overwrite=True))
        seconds = time.perf_counter() - started
    return {"images": summary.samples, "seconds": seconds, "img_s": summary.samples / seconds,
            "startup_s": summary.startup_s, "finalize_s": summary.finalize_s, "input_shards": summary.input_shards,
            "driver_peak_rss_mb": peak.driver_mb, "actor_peak_rss_mb": sorted(peak.actors_mb().values()),
            "store_objects": sum(1 for p in store.rglob("*") if p.is_file()),
            "arrays": TokenStore(str(store)).attrs()["arrays"]}


def rss_curve(model: Path, shards: Path, count: int, batch_size: int) -> list[float]:
    """RSS (MiB) of this process after each of the first `count` input shards it encodes in turn,
    one work unit each, as an encoding actor does: flat after warm-up means nothing accumulates."""
    import gc

    import psutil

    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.runtime.storage import join
    from tokenmill.pipeline.shards.manifest import read_manifest
    from tokenmill.pipeline.tokens.encode_unit import encode_unit
    from tokenmill.pipeline.tokens.extraction import ExtractionOptions, load_tokenizer
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import TokenStore

    entries = read_manifest(str(shards), {})["shards"][:count]
    encoder = load_tokenizer(resolve_model(str(model)), ExtractionOptions.build(False, None, None, None))
    layout = plan_layout([(join(str(shards), s["url"]), s["split"], s["count"]) for s in entries],
                         max(spec.row_bytes for spec in encoder.specs))
    store = TokenStore(str(shards.parent / "rss-curve.zarr"))
    store.prepare({"model_uri": str(model), "mode": "codes"}, layout, encoder.specs, overwrite=True)
    me, curve = psutil.Process(), []
    for unit in layout.units:
        encode_unit(unit, store, layout.rows_per_zarr_shard, encoder, batch_size, {})
        gc.collect()
        curve.append(round(me.memory_info().rss / 2**20, 1))
    print(f"one process encoding {len(curve)} input shards in turn: RSS after each (MiB) {curve}")
    return curve


def objects_for(samples: int, per_shard: int, arrays: list[dict[str, Any]]) -> dict[str, int]:
    """Objects of a finished store of `samples` in input shards of `per_shard` with these token
    arrays (a store's `arrays` attribute), from the real layout (`plan_layout`) and store nodes
    (`store_objects`)."""
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store_format import ArraySpec
    from tokenmill.pipeline.tokens.store_nodes import store_objects

    specs = [ArraySpec(**dict(a, row_shape=tuple(a["row_shape"]))) for a in arrays]

    shards = math.ceil(samples / per_shard)
    layout = plan_layout([(f"s{i}", "train", min(per_shard, samples - i * per_shard)) for i in range(shards)],
                         max(spec.row_bytes for spec in specs))
    return {"input_shards": shards, "work_units": len(layout.units), "shards_per_unit": layout.shards_per_unit,
            "rows_per_zarr_shard": layout.rows_per_zarr_shard, **store_objects(layout, specs)}


def _print(result: dict[str, Any]) -> None:
    shard, runs, billion = result["shard"], result["tokenize"], result["billion"]
    print(f"shard writing ({result['quarter']} images): 1 writer {shard['one_writer']['img_s']:.0f} img/s, "
          f"{result['workers']} writers {shard['parallel']['img_s']:.0f} img/s (x{shard['speedup']:.2f})")
    for name in ("quarter", "n"):
        run = runs[name]
        print(f"tokenize {run['images']}: {run['seconds']:.1f} s, {run['img_s']:.0f} img/s, driver peak "
              f"{run['driver_peak_rss_mb']:.0f} MiB, actors {[round(x) for x in run['actor_peak_rss_mb']]} MiB, "
              f"{run['store_objects']} objects, finalize {run['finalize_s']:.2f} s")
    print(f"scale_ratio {result['scale_ratio']:.2f} for {result['size_ratio']:.0f}x the images (target <= 4.2); "
          f"finalize share {result['finalize_share']:.1%} (target <= 5%)")
    print(f"10^9 samples in 10,000-sample shards: {billion['work_units']:,} work units of "
          f"{billion['shards_per_unit']} input shards, {billion['total']:,} objects in all (target <= 100k)")
