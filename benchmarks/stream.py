"""`tokenmill bench stream`: images/s through the Ray Data stream vs a plain single-process loop.

Both read the same WebDataset shards of 32x32 RGB JPEGs and produce uint8 batches
(B, 32, 32, 3): the baseline iterates `webdataset.WebDataset` and decodes each image with PIL in
this process; the Ray path is `pipeline.shards.stream.open_stream` (one task per shard, robust decode,
numpy batches) iterated with `iter_batches`. The Ray path is measured for each `--cpus` value
(Ray restarted with that many CPUs) after one warm-up pass that starts the workers; the
baseline is re-measured right before each Ray run and the ratio uses that pair.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from typing import Any

DEFAULT_IMAGES = 20_000
DEFAULT_SHARDS = 16
BATCH = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, positive_int

    parser = subparsers.add_parser(
        "stream", help="Ray Data shard stream vs a single-process webdataset + PIL loop (32x32 JPEGs)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=positive_int, default=DEFAULT_IMAGES, help="images (default %(default)s)")
    parser.add_argument("--shards", type=positive_int, default=DEFAULT_SHARDS, help="shards (default %(default)s)")
    parser.add_argument("--cpus", type=_cpu_counts, default=str(os.cpu_count() or 1),
                        help="comma-separated Ray CPU counts to measure, e.g. 1,2 (default: all cores)")
    add_json_option(parser)
    parser.set_defaults(run=run)


def _cpu_counts(text: str) -> list[int]:
    """`--cpus 1,2` -> [1, 2]; refused by argparse unless every entry is a positive integer."""
    try:
        cpus = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        cpus = []
    if not cpus or min(cpus) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return cpus


def make_shards(folder: str, images: int, shards: int) -> list[str]:
    """`images` smooth random 32x32 RGB images as JPEG shards under `folder`; their URLs."""
    from tokenmill.pipeline.shards.manifest import shard_urls
    from tokenmill.pipeline.shards.synthetic import smooth_images, write_image_shards

    dest = write_image_shards(smooth_images(images, seed=0), folder, "images", "jpg", maxcount=-(-images // shards))
    return shard_urls(dest)


def baseline(urls: list[str]) -> tuple[int, float]:
    """(images, seconds) for webdataset + PIL in this process, batched like the stream."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    start, count, batch = time.perf_counter(), 0, []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        batch.append(np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
        if len(batch) == BATCH:
            count += len(np.stack(batch))
            batch = []
    count += len(np.stack(batch)) if batch else 0
    return count, time.perf_counter() - start


def ray_stream(urls: list[str], num_cpus: int) -> tuple[int, float]:
    """(images, seconds) through open_stream with Ray limited to `num_cpus`, after a warm-up."""
    import ray

    from tokenmill.pipeline.shards.images import TransformConfig
    from tokenmill.pipeline.shards.stream import StreamConfig, open_stream

    config = StreamConfig(transform=TransformConfig(size=32, channels=3, resize="resize"), shuffle=False,
                          ordered=False)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for _ in open_stream(urls[:num_cpus], config).dataset.iter_batches(batch_size=BATCH):
            pass  # warm-up: worker processes started, modules imported
        start, count = time.perf_counter(), 0
        for batch in open_stream(urls, config).dataset.iter_batches(batch_size=BATCH, prefetch_batches=4):
            count += len(batch["image"])
        return count, time.perf_counter() - start
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    cpus = args.cpus
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as folder:
        urls = make_shards(folder, args.images, args.shards)
        by_cpus = {}
        for num_cpus in cpus:  # baseline re-measured next to each Ray run: the ratio survives load drift
            n, seconds = baseline(urls)
            baseline_img_s = n / seconds
            m, seconds = ray_stream(urls, num_cpus)
            if m != n:
                raise RuntimeError(f"Ray stream delivered {m} images, baseline {n}")
            ray_img_s = m / seconds
            by_cpus[str(num_cpus)] = dict(ray_img_s=round(ray_img_s, 1), baseline_img_s=round(baseline_img_s, 1),
                                          ratio=round(ray_img_s / baseline_img_s, 3))
            print(f"num_cpus={num_cpus}: ray stream {ray_img_s:,.0f} img/s, baseline (webdataset + PIL, "
                  f"1 process) {baseline_img_s:,.0f} img/s, ratio {ray_img_s / baseline_img_s:.2f}")
    top = by_cpus[str(cpus[-1])]
    return dict(top, num_cpus=cpus[-1], by_num_cpus=by_cpus, images=n, shards=len(urls), batch_size=BATCH,
                cpu_count=os.cpu_count())
