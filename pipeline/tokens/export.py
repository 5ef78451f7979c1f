"""`tokenmill export`: a finished token store as a Megatron indexed dataset or a Parquet file.

Every exported sequence is exactly `TokenDataset`'s item for the same split and options: codes
in raster order, levels concatenated, optionally preceded by a BOS token (`add_bos`) and/or a
class token (`class_token`), with TokenDataset's vocabulary (codes [0, K), BOS = K, class tokens
after). Items go out in TokenDataset's order, one batch of rows at a time, so memory stays at a
batch plus TokenDataset's bounded cache whatever the store's size.

    megatron  OUT.bin  the tokens, uint16 when the vocabulary has < 65,500 entries, else int32
              OUT.idx  megatron-core's `MMIDIDX` index (version 1): one sequence and one
                       document per sample, as `megatron.core.datasets.indexed_dataset` reads it
              OUT.json the metadata below (lineage, vocabulary, split), the sidecar Megatron lacks
    parquet   OUT      one row per sample: key, label, split, tokens (list); the schema's
                       `tokenmill` metadata entry holds the same JSON

The index layout is written here rather than through megatron-core's `IndexedDatasetBuilder`:
that needs megatron-core (a test-only dependency), ~7 s of imports, local paths and a Python
call per sample; the tests read every export back with megatron-core's own reader.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import struct
import sys
from typing import Any

import numpy as np

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.redaction import redact
from tokenmill.pipeline.runtime.storage import filesystem
from tokenmill.pipeline.tokens.dataset import TokenDataset

FORMATS = ("megatron", "parquet")
SPLITS = ("train", "val", "all")
CACHE_BYTES = 256 << 20  # TokenDataset reads the split at once below this, else through its chunk cache
_MEGATRON_HEADER = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


@dataclasses.dataclass
class ExportSummary:
    """What `tokenmill export --json` writes."""

    format: str
    split: str
    samples: int
    seq_len: int
    vocab_size: int
    dtype: str
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_store(
    store_url: str, fmt: str, out: str, *, split: str = "train", add_bos: bool = False, class_token: bool = False,
    num_classes: int | None = None, batch_size: int = 4096, storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> ExportSummary:
    """Write the items of `split` ("all" for every split) in format `fmt` to `out`."""
    if fmt not in FORMATS or split not in SPLITS:
        raise UserError(f"export: --format must be one of {', '.join(FORMATS)} and --split one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    options = dict(storage_options or {})
    dataset = TokenDataset(store_url, None if split == "all" else split, add_bos=add_bos, class_token=class_token,
                           num_classes=num_classes, storage_options=options, cache_bytes=CACHE_BYTES)
    dtype = np.dtype(np.uint16 if dataset.vocab_size < 65_500 else np.int32)  # megatron's own rule
    meta = _metadata(dataset, store_url, split, dtype)
    writer = (MegatronWriter if fmt == "megatron" else ParquetWriter)(out, dtype, dataset.seq_len, meta, options)
    with _progress(len(dataset), progress) as bar:
        for batch in _batches(dataset, split, batch_size):
            writer.write(batch)
            bar.update(len(batch["keys"]))
    files = writer.close()
    return ExportSummary(fmt, split, len(dataset), dataset.seq_len, dataset.vocab_size, dtype.name, files)


def _metadata(dataset: TokenDataset, store_url: str, split: str, dtype: np.dtype) -> dict[str, Any]:
    """The export's lineage and vocabulary: enough to train on it and to trace it to its store
    (absolute, and the store's own lineage: its model's sha256, locations and registry)."""
    from tokenmill.pipeline.registry.resolver import absolute_location

    attrs = dataset.store.attrs()
    k, bos = dataset.codebook_size, dataset.add_bos
    # Key names avoid a "token" suffix, which `redact` treats as a secret's name.
    return redact({
        "store": absolute_location(store_url), "split": split, "samples": len(dataset), "seq_len": dataset.seq_len,
        "dtype": dtype.name, "vocab_size": dataset.vocab_size, "codebook_size": k,
        "bos_id": k if bos else None,
        "class_ids": {"first": k + bos, "num_classes": dataset.num_classes, "no_class": k + bos + dataset.num_classes}
        if dataset.class_token else None,
        "arrays": dataset.specs,  # levels, concatenated in this order after the prefix tokens
        "lineage": attrs["lineage"],
        "store_summary": attrs.get("summary"),
    })


def _batches(dataset: TokenDataset, split: str, batch_size: int):
    """TokenDataset's items in order, with each one's key and split: per input shard of the
    split, its good rows in runs of at most `batch_size` (keys are read for that run only)."""
    group = dataset.store.open_group("r")
    table = {name: group[f"shards/{name}"][:] for name in ("row_start", "count", "split")}
    keys = group["keys"]
    item = 0
    for start, count, name in zip(table["row_start"], table["count"], table["split"]):
        if split != "all" and name != split:
            continue
        for lo in range(0, int(count), batch_size):
            n = min(batch_size, int(count) - lo)
            items = dataset.batch(np.arange(item + lo, item + lo + n))
            yield {"tokens": items["tokens"].numpy(), "labels": items["labels"].numpy(),
                   "keys": keys[start + lo : start + lo + n], "split": str(name)}
        item += int(count)


class MegatronWriter:
    """OUT.bin while streaming; OUT.idx and OUT.json at close (every sequence has `seq_len` tokens)."""

    def __init__(self, out: str, dtype: np.dtype, seq_len: int, meta: dict[str, Any], options: dict[str, Any]):
        self.fs, self.prefix = filesystem(out, options)
        self.dtype, self.seq_len, self.meta, self.count = dtype, seq_len, meta, 0
        _make_parent(self.fs, self.prefix)
        self.bin = self.fs.open(f"{self.prefix}.bin", "wb")

    def write(self, batch: dict[str, Any]) -> None:
        self.bin.write(np.ascontiguousarray(batch["tokens"], dtype=self.dtype).tobytes())
        self.count += len(batch["tokens"])

    def close(self) -> list[str]:
        self.bin.close()
        n, step = self.count, 1 << 20  # index arrays are written in pieces: 1e9 samples are 20 GB of index
        with self.fs.open(f"{self.prefix}.idx", "wb") as idx:
            idx.write(_MEGATRON_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _MEGATRON_DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))  # sequences, document boundaries
            for lo in range(0, n, step):  # tokens per sequence
                idx.write(np.full(min(step, n - lo), self.seq_len, dtype=np.int32).tobytes())
            for lo in range(0, n, step):  # byte offset of each sequence in OUT.bin
                idx.write((np.arange(lo, min(lo + step, n), dtype=np.int64) * self.seq_len * self.dtype.itemsize).tobytes())
            for lo in range(0, n + 1, step):  # document i is sequence i
                idx.write(np.arange(lo, min(lo + step, n + 1), dtype=np.int64).tobytes())
        self.fs.pipe_file(f"{self.prefix}.json", (json.dumps(self.meta, indent=2, sort_keys=True) + "\n").encode())
        return [f"{self.prefix}.bin", f"{self.prefix}.idx", f"{self.prefix}.json"]


class ParquetWriter:
    """One row group per batch; the schema carries the metadata under `tokenmill`."""

    def __init__(self, out: str, dtype: np.dtype, seq_len: int, meta: dict[str, Any], options: dict[str, Any]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.out, self.seq_len = pa, out, seq_len
        self.schema = pa.schema(
            [("key", pa.string()), ("label", pa.int64()), ("split", pa.string()),
             ("tokens", pa.list_(pa.from_numpy_dtype(dtype)))],
            metadata={"tokenmill": json.dumps(meta, sort_keys=True)},
        )
        self.fs, path = filesystem(out, options)
        _make_parent(self.fs, path)
        self.file = self.fs.open(path, "wb")
        self.writer = pq.ParquetWriter(self.file, self.schema)
        self.dtype = dtype

    def write(self, batch: dict[str, Any]) -> None:
        pa, n = self.pa, len(batch["keys"])
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * self.seq_len)
        tokens = pa.ListArray.from_arrays(offsets, pa.array(batch["tokens"].astype(self.dtype).ravel()))
        columns = [pa.array(np.asarray(batch["keys"], dtype=object), pa.string()), pa.array(batch["labels"]),
                   pa.array([batch["split"]] * n, pa.string()), tokens]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> list[str]:
        self.writer.close()
        self.file.close()
        return [self.out]


def _make_parent(fs, path: str) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="export", unit="sample", file=sys.stderr, disable=not enabled)
