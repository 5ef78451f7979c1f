"""`builtin:mnist5k` (the demo's source, 5,000 digits) written as shuffled shards."""

from __future__ import annotations

from helpers.shards import samples_in_shard_order

from tokenmill.pipeline.shards.manifest import read_manifest
from tokenmill.pipeline.shards.writer import write_shards


def test_class_sorted_source_gives_class_mixed_shards(tmp_path):
    """builtin:mnist5k is class-sorted; its shuffled shards mix all digits from the first batch on,
    in several train shards (Ray Data reads them in parallel)."""
    summary = write_shards("builtin:mnist5k", str(tmp_path / "m"), progress=False)
    assert summary["splits"] == {"train": {"shards": 5, "samples": 4500}, "val": {"shards": 1, "samples": 500}}
    manifest = read_manifest(str(tmp_path / "m"))
    assert manifest["settings"]["shuffle"] is True and manifest["settings"]["seed"] == 0
    assert manifest["settings"]["maxcount"] == 1000  # the resolved default is recorded
    train = [label for split, _, label in samples_in_shard_order(tmp_path / "m") if split == "train"][:256]
    assert len(set(train)) >= 8, sorted(set(train))
