"""The one shard reader: every bad sample gets one record {"shard", "key", "reason"}. (That the
training stream, tokenization and the manifest scan report a shard identically:
tests/integration/test_reader_consumers.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.shards import DIRTY_GOOD as GOOD
from helpers.shards import DIRTY_KINDS as EXPECTED_KINDS
from helpers.shards import write_dirty_shard

from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.shards.problems import ShardError, kind_of
from tokenmill.pipeline.shards.reader import ShardSample, pixels_decoder, read_shard


@pytest.fixture(scope="module")
def dirty_shard(tmp_path_factory) -> str:
    """A corrupt PNG, a sample without an image and a cut tar (helpers.shards.write_dirty_shard)."""
    return write_dirty_shard(tmp_path_factory.mktemp("dirty") / "dirty-000000.tar")


def test_the_reader_yields_pixels_or_one_record_per_bad_sample(dirty_shard):
    items = list(read_shard(dirty_shard, pixels_decoder(TransformConfig(size=16, channels=1))))
    samples = [i for i in items if isinstance(i, ShardSample)]
    errors = [i for i in items if isinstance(i, ShardError)]
    assert [s.key for s in samples] == ["g0", "g1", "g2", "g3"]
    for sample in samples:
        assert sample.pixels.shape == (16, 16, 1) and np.array_equal(sample.pixels[..., 0], GOOD[sample.key])
    assert [s.label for s in samples] == [3, -1, -1, -1]
    assert {e.key: kind_of(e.reason) for e in errors} == EXPECTED_KINDS
    assert all(e.shard == dirty_shard for e in errors)
    assert errors[-1].as_dict() == {"shard": dirty_shard, "key": "g4", "reason": errors[-1].reason}


