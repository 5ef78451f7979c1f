"""The pipelined work unit (read-ahead across input shards, launched batches, a writer thread)
against the serial one it replaced: the same store bytes and marker results, the same error for
a bad shard, and no thread of the unit left running after a failure."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.tokens import array_bytes, tokenize_data

from tokenmill.models.errors import UserError
from tokenmill.pipeline.shards.reader import good_samples, pixels_decoder, read_shard, sample_batches
from tokenmill.pipeline.tokens import store_code_stats
from tokenmill.pipeline.tokens.encode_unit import encode_unit
from tokenmill.pipeline.tokens.store import TokenStore

PIPELINE_THREADS = ("unit-writer", "shard-decode", "decode")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The first 3 of the tokenize tests' shards (9 samples each, the first with a corrupt and an
    image-less sample) and the encoder."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.shards.manifest import read_manifest
    from tokenmill.pipeline.tokens.encoder import TokenEncoder

    data = tokenize_data(tmp_path_factory.mktemp("pipelined"))
    encoder = TokenEncoder(resolve_model(data["model"]), latents=False)
    shards = [(f"{data['shards']}/{s['url']}", s["split"], s["count"]) for s in read_manifest(data["shards"])["shards"]]
    return encoder, shards[:3]


def _store(path: Path, encoder, shards, max_units: int):
    from tokenmill.pipeline.tokens.layout import plan_layout

    layout = plan_layout(shards, max(spec.row_bytes for spec in encoder.specs), max_units=max_units)
    store = TokenStore(str(path))
    store.prepare({"model_uri": "test", "mode": "codes"}, layout, encoder.specs, overwrite=False)
    return store, layout


def serial_unit(unit, store, rows_per_zarr_shard, encoder, batch_size):
    """The unit as it was done before: one thread reads, decodes, encodes and writes in turn."""
    region = store.writer(unit, rows_per_zarr_shard, encoder.specs)
    results = []
    for shard in unit.shards:
        corrupt: list[dict[str, str]] = []
        counts = {s.name: np.zeros(s.codebook_size, dtype=np.int64) for s in encoder.specs}
        items = read_shard(shard.url, pixels_decoder(encoder.transform))
        for images, labels, keys in sample_batches(good_samples(items, corrupt), batch_size):
            rows = encoder.encode(images, labels, keys)
            for name in counts:
                counts[name] += store_code_stats.count_codes(rows[name], len(counts[name]))
            region.append({**rows, "keys": np.array(keys, dtype=object), "labels": labels})
        results.append({"rows": region.end_shard(), "corrupt": corrupt,
                        "code_counts": {n: store_code_stats.to_sparse(c) for n, c in counts.items()}})
    region.close()
    store.write_marker(unit, results)
    return results


def _pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(PIPELINE_THREADS)]


def test_pipelined_units_write_the_serial_store_byte_for_byte(inputs, tmp_path):
    encoder, shards = inputs
    stores, results = [], []
    for name, run in (("serial", serial_unit), ("pipelined", None)):
        # One unit of 3 input shards: the read-ahead crosses shard boundaries; batch 4 splits every shard.
        store, layout = _store(tmp_path / f"{name}.zarr", encoder, shards, max_units=1)
        for unit in layout.units:
            if run is None:
                results.append(encode_unit(unit, store, layout.rows_per_zarr_shard, encoder, 4, {}, decode_threads=3))
            else:
                results.append(run(unit, store, layout.rows_per_zarr_shard, encoder, 4))
        store.finalize(layout, encoder.specs)
        stores.append(array_bytes(tmp_path / f"{name}.zarr"))
    assert [len(u.shards) for u in layout.units] == [3]
    assert stores[0] == stores[1] and len(stores[0]) > 10
    assert results[0] == results[1]
    assert len(results[0][0]["corrupt"]) == 2 and results[0][0]["rows"] == shards[0][2] - 1  # the planted bad samples
    assert _pipeline_threads() == []


def test_a_write_or_read_error_fails_the_unit_as_before_and_stops_every_thread(inputs, tmp_path):
    encoder, shards = inputs
    # The manifest under-counts the second shard: the region writer refuses the extra rows, in its thread.
    undercounted = [shards[0], (shards[1][0], shards[1][1], 4), *shards[2:]]
    messages = []
    for name, run in (("serial", serial_unit), ("pipelined", encode_unit)):
        store, layout = _store(tmp_path / f"{name}.zarr", encoder, undercounted, max_units=1)
        with pytest.raises(UserError, match="holds more samples than its manifest lists") as err:
            run(layout.units[0], store, layout.rows_per_zarr_shard, encoder, 2, *(({},) if name == "pipelined" else ()))
        messages.append(str(err.value))
        assert not store.finished()  # nothing committed
    assert messages[0] == messages[1]
    assert _pipeline_threads() == []
    # A shard that cannot be read fails in the read-ahead thread; the error reaches the caller.
    missing = [shards[0], (shards[1][0] + ".gone", shards[1][1], shards[1][2]), *shards[2:]]
    store, layout = _store(tmp_path / "missing.zarr", encoder, missing, max_units=1)
    with pytest.raises(FileNotFoundError):
        encode_unit(layout.units[0], store, layout.rows_per_zarr_shard, encoder, 2, {}, decode_threads=2)
    assert not store.finished()
    assert _pipeline_threads() == []
