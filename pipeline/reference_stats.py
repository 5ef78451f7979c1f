"""`tokenmill fid-stats SHARDS --split val --out ref.npz`: the reference statistics that gFID,
precision and recall are measured against, computed by tokenmill from a shard split.

Every good sample of the split (or its first `limit`) is read once, in manifest then tar order,
through the one shard reader: decoded to RGB, brought to `resolution` x `resolution` by the shard
transform (`center-crop`: shorter side to the resolution with PIL bilinear, central window;
`resize`: squashed; images already at the resolution are not resampled), then through FID's
Inception (`pipeline.generation_eval`). The resolution defaults to the split's first image's
shorter side. Nothing is random and the order is fixed: two runs write identical bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Literal

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.generation_eval import (
    InceptionWeights,
    inception_protocol,
    load_evaluator,
    log_result_run,
    write_reference,
)
from tokenmill.pipeline.shards.images import DecodeError, TransformConfig, open_image
from tokenmill.pipeline.shards.manifest import shards_for_split
from tokenmill.pipeline.shards.reader import ShardSample, good_samples, pixels_decoder, read_shard, sample_batches
from tokenmill.pipeline.shards.wds_io import Sample

RESIZE_FILTER = "PIL bilinear (not applied to images already at the resolution)"


@dataclasses.dataclass
class StatsOptions:
    resolution: int | None = None  # None: the split's first image's shorter side
    crop: Literal["center-crop", "resize"] = "center-crop"
    limit: int | None = None  # the first N images of the split; None: all
    batch_size: int = 50
    inception: InceptionWeights = dataclasses.field(default_factory=InceptionWeights)
    device: str = "cpu"
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    tracking_uri: str | None = None


@dataclasses.dataclass
class StatsSummary:
    """What `tokenmill fid-stats --json` writes: identical for identical inputs (without MLflow)."""

    data: str
    split: str
    out: str
    out_sha256: str
    images: int
    protocol: dict[str, Any]
    inception: dict[str, str]
    skipped_samples: dict[str, Any]
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_stats(data: str, split: str, out: str, options: StatsOptions) -> StatsSummary:
    """Write the reference file `out` (any fsspec URL) for `data`'s `split`; UserError for a missing
    split, missing or mismatched Inception weights, or fewer than 2 readable images."""
    urls = shards_for_split(data, split, options.storage_options)
    evaluator = load_evaluator(options.inception, options.device)  # nothing to compute without it: UserError
    resolution = options.resolution or first_image_side(urls, options.storage_options)
    transform = TransformConfig(size=resolution, channels=3, resize=options.crop)
    errors: list[dict[str, str]] = []
    pools = [evaluator.features(torch.from_numpy(batch).permute(0, 3, 1, 2))[0]  # (b, 2048) each
             for batch in split_images(urls, transform, options, errors)]
    images = sum(len(p) for p in pools)
    if images < 2:
        raise UserError(f"{data}: the {split} split has {images} readable image(s); statistics need at least 2")
    protocol = inception_protocol(evaluator, resolution=resolution, resize_filter=RESIZE_FILTER, crop=options.crop,
                                  split=split, n=images, cfg=None, source="tokenmill fid-stats")
    sha256 = write_reference(out, torch.cat(pools), protocol, options.storage_options)
    summary = StatsSummary(data=data, split=split, out=out, out_sha256=sha256, images=images, protocol=protocol,
                           inception=evaluator.weights,
                           skipped_samples={"count": len(errors), "samples": errors[:20]})
    if options.tracking_uri:
        summary.mlflow_run_id = log_result_run(options.tracking_uri, "tokenmill-fid-stats", f"fid-stats-{split}",
                                               protocol, {"images": float(images)}, summary.to_json())
    return summary


def split_images(urls: list[str], transform: TransformConfig, options: StatsOptions,
                 errors: list[dict[str, str]]) -> Iterator[np.ndarray]:
    """uint8 (b, R, R, 3) batches of the split's good samples, at most `options.limit` in all."""
    left = options.limit if options.limit is not None else float("inf")
    for url in urls:
        samples = good_samples(read_shard(url, pixels_decoder(transform), options.storage_options), errors)
        for batch, _, _ in sample_batches(samples, options.batch_size):
            batch = batch[: int(min(left, len(batch)))]
            left -= len(batch)
            yield batch
            if left <= 0:
                return


def first_image_side(urls: list[str], storage_options: dict | None = None) -> int:
    """The shorter side of the split's first readable image (the default resolution)."""
    for url in urls:
        for item in read_shard(url, None, storage_options):
            if isinstance(item, ShardSample):
                _, data = Sample(item.key, item.members).image_member()
                try:
                    return min(open_image(data, TransformConfig().max_pixels).size)  # the header only
                except DecodeError:  # an unreadable first sample: try the next one
                    continue
    raise UserError(f"no readable image in {len(urls)} shard(s); pass --resolution or check the shards")
