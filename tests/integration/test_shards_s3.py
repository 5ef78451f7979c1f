"""s3:// end to end through s3fs against moto's S3-compatible server on 127.0.0.1."""

from __future__ import annotations

import numpy as np

from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.manifest import read_manifest, scan_shard, shards_for_split
from tokenmill.pipeline.shards.stream import StreamConfig, open_stream
from tokenmill.pipeline.shards.writer import ShardSettings, write_shards


def test_write_and_stream_through_s3(ray_local, s3_server, s3_bucket, tmp_path):
    options = s3_server["storage_options"]
    images = np.random.default_rng(2).integers(0, 256, (23, 10, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(23) % 4)
    dest = f"{s3_bucket}/data"
    settings = ShardSettings(maxcount=5, val_fraction=0.2, labels=str(tmp_path / "labels.npy"))
    summary = write_shards(str(tmp_path / "images.npy"), dest, settings, options, progress=False)
    assert summary["samples"] == 23 and summary["shards_written"] == len(read_manifest(dest, options)["shards"])
    assert write_shards(str(tmp_path / "images.npy"), dest, settings, options, progress=False)["shards_written"] == 0

    train = shards_for_split(dest, "train", options)
    assert all(url.startswith(f"{s3_bucket}/data/train-") for url in train)
    assert scan_shard(train[0], options).problems == []
    urls = train + shards_for_split(dest, "val", options)
    stream = open_stream(urls, StreamConfig(transform=TransformConfig(size=10)), storage_options=options)
    rows = stream.dataset.to_pandas()
    assert sorted(rows["key"]) == [f"images-{i:07d}" for i in range(23)]
    for key, image, label in zip(rows["key"], rows["image"], rows["label"]):
        i = int(key.split("-")[1])
        assert np.array_equal(np.asarray(image), images[i]) and label == i % 4
    assert stream.report()["skipped"] == 0
