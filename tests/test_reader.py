"""The one shard reader: every bad sample gets one record {"shard", "key", "reason"}, the same
whether the training stream, tokenization or the manifest scan reads the shard."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from tokenize_helpers import make_vqvae

from pipeline.shards.images import TransformConfig
from pipeline.shards.problems import CORRUPT_IMAGE, NO_IMAGE, TRUNCATED_TAR, ShardError, kind_of
from pipeline.shards.reader import ShardSample, pixels_decoder, read_shard

GOOD = {f"g{i}": np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8) for i in range(6)}


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def dirty_shard(tmp_path_factory) -> str:
    """g0..g5 grey PNGs, a corrupt PNG ("bad"), a sample without an image ("text"), and the tar
    cut inside g5's data: g4 (which may lack members behind the cut) and g5 are lost, and the
    truncation is reported under g4, the sample being read."""
    members = [("g0.png", png(GOOD["g0"])), ("g0.cls", b"3"), ("bad.png", png(GOOD["g1"])[:-40]),
               ("g1.png", png(GOOD["g1"])), ("text.txt", b"no image"), ("text.cls", b"1")]
    members += [(f"g{i}.png", png(GOOD[f"g{i}"])) for i in range(2, 6)]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = out.getvalue()
    cut = whole.index(png(GOOD["g5"])) + 20  # inside g5's PNG data
    path = tmp_path_factory.mktemp("dirty") / "dirty-000000.tar"
    path.write_bytes(whole[:cut])
    return str(path)


EXPECTED_KINDS = {"bad": CORRUPT_IMAGE, "text": NO_IMAGE, "g4": TRUNCATED_TAR}


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


def test_stream_tokenization_and_scan_report_a_dirty_shard_identically(ray_local, dirty_shard, tmp_path):
    from pipeline.registry.model_ref import resolve_model
    from pipeline.shards.manifest import scan_shard
    from pipeline.shards.stream import StreamConfig, open_stream
    from pipeline.tokens.encode_unit import encode_unit
    from pipeline.tokens.encoder import TokenEncoder
    from pipeline.tokens.layout import plan_layout
    from pipeline.tokens.store import TokenStore, describe_store

    encoder = TokenEncoder(resolve_model(str(make_vqvae(tmp_path / "model"))), latents=False)
    stream = open_stream([dirty_shard], StreamConfig(transform=encoder.transform, shuffle=False))
    assert sorted(stream.dataset.to_pandas()["key"]) == ["g0", "g1", "g2", "g3"]
    streamed = stream.report()["errors"]

    layout = plan_layout([(dirty_shard, "train", 7)], max(spec.row_bytes for spec in encoder.specs))
    store = TokenStore(str(tmp_path / "tokens.zarr"))
    store.prepare({"model_uri": "test", "mode": "codes"}, layout, encoder.specs, overwrite=False)
    [result] = encode_unit(layout.units[0], store, layout.rows_per_zarr_shard, encoder, 2, {})
    assert result["rows"] == 4
    store.finalize(layout, encoder.specs)
    tokenized = describe_store(str(tmp_path / "tokens.zarr"))["corrupt"]  # the store's report

    def ordered(records):
        return sorted(records, key=lambda r: (r["shard"], r["key"], r["reason"]))

    assert ordered(result["corrupt"]) == ordered(tokenized) == ordered(streamed)
    assert {r["key"]: kind_of(r["reason"]) for r in streamed} == EXPECTED_KINDS
    assert all(set(r) == {"shard", "key", "reason"} and r["shard"] == dirty_shard for r in streamed)
    assert ordered(scan_shard(dirty_shard).problems) == ordered(streamed)
