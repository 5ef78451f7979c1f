"""The Zarr v3 token store: layout, lineage, shard-aligned region writes, markers, report.

Layout of STORE (every node is plain Zarr v3, so `zarr.open_group(STORE)` reads it all):

    codes | codes_<level>...   (rows, h, w) uint16/uint32   — or `latents` (rows, ...) float16
    keys                       (rows,) str, "" on padding rows
    labels                     (rows,) int64, -1 when none / padding
    shards/{url,split,row_start,capacity,count}   one entry per input shard (driver-written)
    codebook_counts[_<level>]  (K,) int64 per-code counts over the whole dataset (driver-written)
    markers/<shard>            a group per finished input shard; its attributes are the shard's
                               result (rows, corrupt samples, code counts). Written by the shard's
                               writer only after its rows are committed.
    report                     group whose attributes list every corrupt sample (key, shard, reason)

Input shard i owns rows [row_start, row_start + capacity) (see `token_layout`); its good samples
fill the first `count` rows in tar order. Only the driver writes attributes and the small
driver arrays, before any writer starts (create) and after all have finished (finalize).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import fsspec
import numpy as np
import zarr

from models.errors import UserError
from pipeline.redaction import redact
from pipeline.tokens import codebook_stats
from pipeline.tokens.layout import InputShardSlot, Layout

FORMAT_VERSION = 1
MARKERS = "markers"
REPORT = "report"
# Lineage entries that may differ between runs writing one store: the same weights reached by
# another URI (runs:/ vs models:/name@alias), the same manifest under another URL, or a newer
# tokenmill produce the same tokens.
_LINEAGE_LABELS = ("model_uri", "model_version", "data", "tokenmill_version")


def tokenmill_version() -> str:
    try:
        return version("tokenmill")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ArraySpec:
    """One per-row token array: `codes` / `codes_<level>` (with its codebook size) or `latents`."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    codebook_size: int | None = None

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * np.dtype(self.dtype).itemsize

    @property
    def counts_name(self) -> str:
        return self.name.replace("codes", "codebook_counts", 1)


def codes_dtype(codebook_size: int) -> str:
    return "uint16" if codebook_size <= 65_536 else "uint32"


def _zarr_kwargs(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """zarr wants plain paths for local stores and fsspec URLs (+ options) for the rest."""
    if url.startswith("file://"):
        return {"store": url[len("file://"):]}
    if "://" in url:
        return {"store": url, "storage_options": storage_options}
    return {"store": url}


class TokenStore:
    """A token store at an fsspec URL. Driver methods: `prepare`, `finished`, `finalize`;
    writer methods: `writer`, `write_marker`; readers use `open_group`/`describe_store`."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)

    def open_group(self, mode: str = "r") -> zarr.Group:
        try:
            return zarr.open_group(mode=mode, zarr_format=3, **_zarr_kwargs(self.url, self.storage_options))
        except (OSError, ValueError, zarr.errors.BaseZarrError) as err:  # missing, not a group, corrupt JSON
            raise UserError(f"{self.url} is not a readable Zarr token store ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); check the URL") from None

    def attrs(self) -> dict[str, Any]:
        return dict(self.open_group("r").attrs)

    def token_attrs(self) -> dict[str, Any]:
        """The attributes of the tokenmill store at `url` (lineage, layout, arrays); UserError
        naming the URL when there is no store, or a Zarr group tokenmill did not write."""
        if not self.exists():
            raise UserError(f"{self.url} is not a token store (no zarr.json); create one with `tokenmill tokenize`")
        attrs = self.attrs()
        if "lineage" not in attrs or "arrays" not in attrs:
            raise UserError(f"{self.url} is a Zarr group but not a tokenmill token store")
        return attrs

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    # ------------------------------------------------------------------ driver: create / resume
    def prepare(self, lineage: dict[str, Any], layout: Layout, specs: list[ArraySpec], overwrite: bool) -> None:
        """Create the store, or check that the existing one was made by the same model and
        config (else UserError naming both, unless `overwrite`). The lineage is recorded redacted."""
        lineage = redact(lineage)
        if self.fs.isfile(self.root):
            raise UserError(f"{self.url} is a file; the token store must be a folder (choose another --out)")
        if self.exists() and overwrite:
            self.fs.rm(self.root, recursive=True)
        elif self.exists():
            attrs = self.attrs()
            state = attrs.get("tokenmill", {}).get("state")
            if state == "creating" and not self.finished():
                pass  # the driver died while creating: nothing was written yet, start again
            else:
                self._check_same_run(attrs, lineage, layout, specs)
                self._remove_partial_files()
                return
        self._create(lineage, layout, specs)

    def _check_same_run(self, attrs: dict, lineage: dict, layout: Layout, specs: list[ArraySpec]) -> None:
        if attrs.get("tokenmill", {}).get("format") != FORMAT_VERSION:
            raise UserError(f"{self.url} is not a tokenmill token store (format {FORMAT_VERSION}); "
                            "choose another --out or pass --overwrite")
        old = {"lineage": attrs.get("lineage", {}), "layout": attrs.get("layout"), "arrays": attrs.get("arrays")}
        new = {"lineage": lineage, "layout": layout.to_dict(), "arrays": [_spec_json(s) for s in specs]}
        old_id, new_id = _identity(old), _identity(new)
        if old_id != new_id:
            differs = sorted(k for k in set(old_id) | set(new_id) if old_id.get(k) != new_id.get(k))
            raise UserError(
                f"{self.url} was made by {_describe_lineage(old['lineage'])}; this run uses "
                f"{_describe_lineage(lineage)} (differs in {', '.join(differs)}); pass --overwrite "
                "to replace the store or choose another --out"
            )

    def _remove_partial_files(self) -> None:
        """zarr's local store writes `<key>.<uuid>.partial` then renames; a killed writer leaves
        the temp file behind (the data it was writing is rewritten by the rerun)."""
        if "file" in self.fs.protocol:
            for path in self.fs.glob(f"{self.root}/**/*.partial"):
                self.fs.rm(path)

    def _create(self, lineage: dict, layout: Layout, specs: list[ArraySpec]) -> None:
        attrs = {
            "tokenmill": {"format": FORMAT_VERSION, "state": "creating"},
            "lineage": lineage,
            "layout": layout.to_dict(),
            "arrays": [_spec_json(s) for s in specs],
        }
        group = zarr.create_group(overwrite=True, attributes=attrs, **_zarr_kwargs(self.url, self.storage_options))
        rows, shard = layout.rows, layout.rows_per_zarr_shard
        for spec in specs:
            fill = 0.0 if spec.codebook_size is None else 0
            group.create_array(
                spec.name, shape=(rows, *spec.row_shape), dtype=spec.dtype, fill_value=fill,
                chunks=(layout.chunk_rows, *spec.row_shape), shards=(shard, *spec.row_shape),
            )
        # One object per Zarr shard for the small per-row arrays too (no inner chunking needed).
        group.create_array("keys", shape=(rows,), dtype=str, fill_value="", chunks=(shard,))
        group.create_array("labels", shape=(rows,), dtype="int64", fill_value=-1, chunks=(shard,))
        table = group.create_group("shards")
        n = len(layout.shards)
        columns = {
            "url": np.array([s.url for s in layout.shards], dtype=object),
            "split": np.array([s.split for s in layout.shards], dtype=object),
            "row_start": np.array([s.row_start for s in layout.shards], dtype=np.int64),
            "capacity": np.array([s.capacity for s in layout.shards], dtype=np.int64),
        }
        for name, values in columns.items():
            dtype = str if values.dtype == object else values.dtype
            fill = "" if dtype is str else 0
            arr = table.create_array(name, shape=(n,), dtype=dtype, chunks=(max(n, 1),), fill_value=fill)
            arr[:] = values
        group.attrs.update({"tokenmill": {"format": FORMAT_VERSION, "state": "open"}})

    # ------------------------------------------------------------------ driver: progress / finalize
    def finished(self) -> dict[int, dict[str, Any]]:
        """Marker attributes of every finished input shard, by shard index."""
        self.fs.invalidate_cache(f"{self.root}/{MARKERS}")  # writers on other processes added markers since
        paths = sorted(self.fs.glob(f"{self.root}/{MARKERS}/*/zarr.json"))
        if not paths:
            return {}
        blobs = self.fs.cat(paths)
        done = {}
        for path in paths:
            attrs = json.loads(blobs[path])["attributes"]
            done[int(attrs["shard"])] = attrs
        return done

    def finalize(self, layout: Layout, specs: list[ArraySpec]) -> dict[str, Any]:
        """After every marker exists: per-shard counts, merged codebook counts, the report and
        the summary attributes. Deterministic: merges in shard order, no timestamps."""
        done = self.finished()
        missing = [s.url for s in layout.shards if s.index not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} input shards are not finished, e.g. {missing[0]}")
        group = self.open_group("r+")
        ordered = [done[s.index] for s in layout.shards]
        counts = np.array([m["rows"] for m in ordered], dtype=np.int64)
        table = group["shards"]
        if "count" not in table:
            table.create_array("count", shape=counts.shape, dtype="int64", chunks=(max(len(counts), 1),), fill_value=-1)
        table["count"][:] = counts
        codebook = {}
        for spec in specs:
            if spec.codebook_size is None:
                continue
            total = np.zeros(spec.codebook_size, dtype=np.int64)
            for marker in ordered:
                total += codebook_stats.from_sparse(marker["code_counts"][spec.name], spec.codebook_size)
            arr = group.create_array(spec.counts_name, shape=total.shape, dtype="int64",
                                     chunks=total.shape, fill_value=0, overwrite=True)
            arr[:] = total
            codebook[spec.name] = codebook_stats.summarize(total)
        corrupt = [dict(item, shard=s.url) for s, m in zip(layout.shards, ordered) for item in m["corrupt"]]
        report = {"samples": int(counts.sum()), "corrupt_count": len(corrupt), "corrupt": corrupt}
        if REPORT in group:
            group[REPORT].attrs.put(report)
        else:
            group.create_group(REPORT, attributes=report)
        splits: dict[str, int] = {}
        for s, n in zip(layout.shards, counts.tolist()):
            splits[s.split] = splits.get(s.split, 0) + n
        summary = {"samples": int(counts.sum()), "corrupt": len(corrupt), "splits": splits, "codebook": codebook}
        group.attrs.update({"tokenmill": {"format": FORMAT_VERSION, "state": "complete"}, "summary": summary})
        return summary

    def item_rows(self, split: str | None = None) -> np.ndarray:
        """Store rows of the good samples (of one split) in item order: each input shard's
        first `count` rows, shards in manifest order. Needs a finished store."""
        table = self.open_group("r")["shards"]
        if "count" not in table:
            raise UserError(f"{self.url} is not finished; rerun `tokenmill tokenize` to complete it")
        starts, counts, splits = table["row_start"][:], table["count"][:], table["split"][:]
        if split is not None and split not in set(splits.tolist()):
            raise UserError(f"{self.url} has no split {split!r}; its splits: {', '.join(sorted(set(splits.tolist())))}")
        keep = np.ones(len(starts), bool) if split is None else splits == split
        return np.concatenate([np.arange(s, s + n) for s, n in zip(starts[keep], counts[keep])] or [np.empty(0, int)])

    # ------------------------------------------------------------------ writers (one per input shard)
    def writer(self, shard: InputShardSlot, rows_per_zarr_shard: int, specs: list[ArraySpec]) -> "RegionWriter":
        return RegionWriter(self, shard, rows_per_zarr_shard, specs)

    def write_marker(self, shard: InputShardSlot, result: dict[str, Any]) -> None:
        """Called after the shard's rows are committed: its existence means "done"."""
        attrs = {"shard": shard.index, "url": shard.url, **result}
        zarr.create_group(overwrite=True, attributes=attrs, **_zarr_kwargs(f"{self.url}/{MARKERS}/{shard.index:06d}",
                                                                         self.storage_options))


class RegionWriter:
    """Appends one input shard's good samples and writes them one whole Zarr shard at a time,
    so memory stays at one Zarr shard and every object is written whole by this writer only.
    `close()` pads the last Zarr shard and rewrites any remaining one as fill, which also
    replaces whatever an earlier, killed attempt left there."""

    def __init__(self, store: TokenStore, shard: InputShardSlot, rows_per_zarr_shard: int, specs: list[ArraySpec]):
        group = store.open_group("r+")
        self.arrays = {name: group[name] for name in [s.name for s in specs] + ["keys", "labels"]}
        self.shard, self.rows_per_zarr_shard = shard, rows_per_zarr_shard
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self.pending_rows = 0
        self.next_row = shard.row_start  # first row of the Zarr shard being filled
        self.rows = 0

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """columns: every token array (n, ...) plus keys (n,) str and labels (n,) int64."""
        n = len(columns["keys"])
        if self.rows + n > self.shard.capacity:
            raise UserError(f"{self.shard.url} holds more samples than its manifest lists "
                            f"({self.shard.count}); rebuild the manifest with `tokenmill shard index`")
        for name in self.arrays:
            self.pending[name].append(columns[name])
        self.pending_rows += n
        self.rows += n
        while self.pending_rows >= self.rows_per_zarr_shard:
            self._flush(self.rows_per_zarr_shard)

    def close(self) -> int:
        """Write the rest (padded) and blank the unused tail of the range; returns good rows."""
        end = self.shard.row_start + self.shard.capacity
        while self.next_row < end:
            self._flush(self.pending_rows)
        return self.rows

    def _flush(self, n: int) -> None:
        """Write the first n pending rows, padded with fill values, as the next whole Zarr shard."""
        lo, hi = self.next_row, self.next_row + self.rows_per_zarr_shard
        for name, arr in self.arrays.items():
            parts = self.pending[name]
            data = np.concatenate(parts) if parts else np.empty((0, *arr.shape[1:]), dtype=_np_dtype(arr))
            block = np.full((self.rows_per_zarr_shard, *arr.shape[1:]), arr.fill_value, dtype=_np_dtype(arr))
            block[:n] = data[:n]
            arr[lo:hi] = block
            self.pending[name] = [data[n:]] if len(data) > n else []
        self.pending_rows -= n
        self.next_row = hi


def _np_dtype(arr: zarr.Array) -> Any:
    return object if arr.dtype.kind == "T" else arr.dtype


def _spec_json(spec: ArraySpec) -> dict[str, Any]:
    return {**asdict(spec), "row_shape": list(spec.row_shape)}


def _identity(run: dict[str, Any]) -> dict[str, Any]:
    """What must match to resume: everything but the labels in `_LINEAGE_LABELS`."""
    lineage = {k: v for k, v in run["lineage"].items() if k not in _LINEAGE_LABELS}
    return {**lineage, "layout": run["layout"], "arrays": run["arrays"]}


def _describe_lineage(lineage: dict[str, Any]) -> str:
    sha = str(lineage.get("weights_sha256", "?"))[:12]
    return f"model {lineage.get('model_uri', '?')} (weights sha256 {sha}…, {lineage.get('mode', '?')})"


def describe_store(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `tokenmill inspect STORE` prints: arrays (shape, dtype, chunks, shards), lineage,
    progress, sample counts per split and codebook statistics."""
    store = TokenStore(url, storage_options)
    attrs = store.token_attrs()
    group = store.open_group("r")
    names = [spec["name"] for spec in attrs["arrays"]] + ["keys", "labels"]
    arrays = {}
    for name in names:
        arr = group[name]
        arrays[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
                        "shards": list(arr.shards) if arr.shards else None}
    done = store.finished()
    report = dict(group[REPORT].attrs) if REPORT in group else {}
    return {
        "url": url,
        "state": attrs["tokenmill"]["state"],
        "lineage": attrs["lineage"],
        "layout": attrs["layout"],
        "arrays": arrays,
        "input_shards": {"total": int(group["shards/url"].shape[0]), "finished": len(done)},
        "summary": attrs.get("summary"),
        "corrupt": report.get("corrupt", []),
    }
