"""`tokenmill shard --workers N`: Ray actors each write their own shard sequence, the driver merges
the manifest. Same seed and N give identical tars; a rerun after a lost shard resumes to the same
bytes; the samples and their planned order are those of the one-writer path."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers.tokens import images

from tokenmill.models.errors import UserError


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _keys(folder: Path, manifest: dict) -> list[str]:
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["url"]) as tar:
            keys.extend(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    return keys


def test_parallel_writers_are_deterministic_resumable_and_keep_the_order(ray_local, tmp_path: Path):
    from tokenmill.pipeline.shards.parallel_writer import write_shards_parallel
    from tokenmill.pipeline.shards.writer import ShardSettings, write_shards

    np.save(tmp_path / "images.npy", images(60))
    src, settings = str(tmp_path / "images.npy"), ShardSettings(maxcount=7, val_fraction=0.2, seed=3)
    a, b, one = tmp_path / "a", tmp_path / "b", tmp_path / "one"
    summary = write_shards_parallel(src, str(a), settings, None, workers=2, progress=False)
    write_shards(src, str(one), settings, progress=False)
    manifest = json.loads((a / "manifest.json").read_text())
    assert summary["samples"] == 60 and len(_tars(a)) == summary["shards"]
    assert {s["worker"] for s in manifest["shards"]} == {0, 1} and manifest["settings"]["workers"] == 2
    # Worker 0's slice then worker 1's, per split: exactly the one-writer path's planned order.
    assert _keys(a, manifest) == _keys(one, json.loads((one / "manifest.json").read_text()))

    # A copy loses each worker's last train shard and the val shards (as if killed before their
    # commits): the rerun writes them again, byte for byte, and the same manifest.
    shutil.copytree(a, b)
    lost = [[s for s in manifest["shards"] if s["worker"] == w and s["split"] == "train"][-1]["url"] for w in (0, 1)]
    lost += [s["url"] for s in manifest["shards"] if s["split"] == "val"]
    for url in lost:
        (b / url).unlink()
    kept = [s for s in manifest["shards"] if s["url"] not in lost]
    (b / "manifest.json").write_text(json.dumps(dict(manifest, shards=kept, complete=False)))
    again = write_shards_parallel(src, str(b), settings, None, workers=2, progress=False)
    assert again["shards_written"] == len(lost) >= 3 and _tars(b) == _tars(a)
    assert (b / "manifest.json").read_bytes() == (a / "manifest.json").read_bytes()

    with pytest.raises(UserError, match="workers"):
        write_shards_parallel(src, str(a), settings, None, workers=3, progress=False)
