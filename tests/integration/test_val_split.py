"""Validation over several val shards with 2 Ray Train workers: the val stream is split between
ranks without dropping rows, so every val image is read (decoded) by exactly one rank."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.stream import StreamConfig, open_stream
from tokenmill.pipeline.training.tasks.image_data import ingest_config

SHARD_SIZES = (22, 13, 7)  # the biggest first: an unordered pass would likely yield the smallest first


def write_val_shards(root: Path) -> tuple[list[str], list[str]]:
    """Uneven tar shards of 8x8 grey PNGs; returns the URLs and every key in stream order."""
    urls, keys = [], []
    for shard, count in enumerate(SHARD_SIZES):
        path = root / f"val-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(count):
                key = f"s{shard}_{i:03d}"
                data = io.BytesIO()
                Image.fromarray(np.full((8, 8), i * 9 % 256, dtype=np.uint8)).save(data, format="PNG")
                info = tarfile.TarInfo(f"{key}.png")
                info.size = data.tell()
                tar.addfile(info, io.BytesIO(data.getvalue()))
                keys.append(key)
        urls.append(str(path))
    return urls, keys


def _record_val_keys(loop_config: dict) -> None:
    """A Ray Train worker: the keys of its share of the val stream, to a file."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("val")
    seen = [key for b in shard.iter_batches(batch_size=5, batch_format="numpy") for key in b["key"]]
    (Path(loop_config["out"]) / f"rank{rank}.json").write_text(json.dumps({"seen": [str(k) for k in seen]}))


def test_each_val_image_is_counted_by_exactly_one_rank(ray_local, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    urls, keys = write_val_shards(tmp_path)
    # The val stream as pipeline.training.tasks.image_data opens it: fixed order, no shuffle.
    stream = open_stream(urls, StreamConfig(transform=TransformConfig(size=8, channels=1), shuffle=False,
                                            shuffle_buffer=0))
    datasets = {"val": stream.dataset}
    TorchTrainer(
        _record_val_keys, train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="val-split", storage_path=str(tmp_path / "ray")),
        datasets=datasets, dataset_config=ingest_config(datasets),
    ).fit()

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    counted = ranks[0]["seen"] + ranks[1]["seen"]  # each rank decodes its share only
    assert len(counted) == sum(SHARD_SIZES) and sorted(counted) == sorted(keys)
