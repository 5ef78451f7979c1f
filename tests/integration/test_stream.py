"""The Ray Data shard stream: exact pixels, deterministic and clocked shuffles, bad input skipped
and reported. (The checks before Ray: tests/unit/test_stream_checks.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
from helpers.shards import png, write_folder_shards, write_tar
from PIL import Image

from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.manifest import shard_urls
from tokenmill.pipeline.shards.problems import kind_of
from tokenmill.pipeline.shards.stream import EPOCH_CLOCK, StreamConfig, open_stream, to_model_input


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory):
    """27 random 12x12 RGB PNGs in 3 class folders, written as uneven shards (maxcount 4)."""
    return write_folder_shards(tmp_path_factory.mktemp("stream"))


def rows_by_key(stream):
    rows = {}
    for batch in stream.dataset.iter_batches(batch_size=16, batch_format="numpy"):
        for image, label, key, shard in zip(batch["image"], batch["label"], batch["key"], batch["shard"]):
            assert key not in rows
            rows[key] = (image, label, shard)
    return rows


def test_folder_to_stream_gives_the_same_pixels(ray_local, folder_shards):
    root, expected = folder_shards
    urls = shard_urls(str(root / "shards"))
    stream = open_stream(urls, StreamConfig(transform=TransformConfig(size=12, channels=3)))
    rows = rows_by_key(stream)
    assert sorted(rows) == sorted(expected)
    for key, (image, label, shard) in rows.items():
        assert image.dtype == np.uint8 and np.array_equal(image, expected[key][0]), key
        assert label == expected[key][1] and shard in urls
    assert stream.report() == {"skipped": 0, "by_reason": {}, "errors": []}
    batch = stream.dataset.take_batch(5)
    x, y = to_model_input(batch)
    assert x.shape == (5, 3, 12, 12) and str(x.dtype) == "torch.float32" and float(x.max()) <= 1.0
    assert str(y.dtype) == "torch.int64"


def test_shuffle_is_deterministic_under_a_seed(ray_local, folder_shards):
    root, _ = folder_shards
    urls = shard_urls(str(root / "shards"), "train")
    config = StreamConfig(transform=TransformConfig(size=8, hflip=True), seed=3, shuffle_buffer=3)

    def keys(epoch):
        return [str(k) for k in open_stream(urls, config, epoch=epoch).dataset.to_pandas()["key"]]

    first, again, other = keys(0), keys(0), keys(1)
    assert first == again and sorted(first) == sorted(other) and first != other


def test_a_clocked_stream_reads_the_epoch_set_before_each_pass(ray_local, folder_shards):
    """Ray Train re-executes one dataset every epoch: each pass must follow the clock, giving
    exactly the rows (order and augmentation) of a stream opened at that epoch."""
    root, _ = folder_shards
    urls = shard_urls(str(root / "shards"), "train")
    config = StreamConfig(transform=TransformConfig(size=8, hflip=True), seed=3, shuffle_buffer=3)

    def rows(dataset):
        frame = dataset.to_pandas()
        return [(str(k), image.tobytes()) for k, image in zip(frame["key"], frame["image"])]

    stream = open_stream(urls, config, epoch=EPOCH_CLOCK)
    passes = {}
    for epoch in (0, 1, 0):
        ray.get(stream.epoch_clock.set.remote(epoch))
        passes.setdefault(epoch, []).append(rows(stream.dataset))
    assert passes[0][0] == passes[0][1] == rows(open_stream(urls, config, epoch=0).dataset)
    assert passes[1][0] == rows(open_stream(urls, config, epoch=1).dataset)
    assert [k for k, _ in passes[1][0]] != [k for k, _ in passes[0][0]]  # shard order + buffer shuffle
    flipped = dict(passes[0][0]).items() ^ dict(passes[1][0]).items()
    assert flipped  # the same keys with other random flips


def test_bad_samples_and_bad_tars_are_reported_and_good_ones_arrive(ray_local, tmp_path):
    rng = np.random.default_rng(1)
    good = {f"g{i}": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(12)}
    jpeg = io.BytesIO()
    Image.fromarray(good["g0"]).save(jpeg, format="JPEG")
    corrupt_jpeg = jpeg.getvalue()[:30] + b"\xff" * 60
    write_tar(tmp_path / "s0.tar", [("g0.png", png(good["g0"])), ("g0.cls", b"1"),
                                    ("badjpg.jpg", corrupt_jpeg), ("g1.png", png(good["g1"])),
                                    ("text.txt", b"not an image"), ("fake.png", b"nope"),
                                    ("g2.png", png(good["g2"]))])
    write_tar(tmp_path / "s1.tar", [(f"{k}.png", png(good[k])) for k in ("g3", "g4", "g5")])
    write_tar(tmp_path / "s2.tar", [(f"{k}.png", png(good[k])) for k in ("g6", "g7", "g8", "g9")])
    whole = (tmp_path / "s2.tar").read_bytes()
    (tmp_path / "s2.tar").write_bytes(whole[: 512 * 2 + len(png(good["g6"])) + 700])  # cut inside g7
    (tmp_path / "s3.tar").write_bytes(b"")  # empty
    write_tar(tmp_path / "s4.tar", [(f"{k}.png", png(good[k])) for k in ("g10", "g11")])
    urls = [str(tmp_path / f"s{i}.tar") for i in range(5)]

    stream = open_stream(urls, StreamConfig(transform=TransformConfig(size=8), shuffle=False))
    rows = rows_by_key(stream)
    arrived = {k for k in good if k not in ("g7", "g8", "g9")}  # lost behind the cut
    assert set(rows) == arrived
    assert all(np.array_equal(rows[k][0], good[k]) for k in arrived)
    assert rows["g0"][1] == 1 and rows["g1"][1] == -1
    report = stream.report()
    assert all(set(r) == {"shard", "key", "reason"} for r in report["errors"])
    found = {(r["shard"].rsplit("/", 1)[-1], r["key"]): kind_of(r["reason"]) for r in report["errors"]}
    assert found.pop(("s0.tar", "badjpg")) in ("corrupt image data", "not an image")
    assert found == {("s0.tar", "text"): "no image member", ("s0.tar", "fake"): "not an image",
                     ("s2.tar", "g7"): "truncated tar", ("s3.tar", ""): "empty tar"}
    assert report["skipped"] == 5


