"""The Zarr v3 token store: layout, lineage, shard-aligned region writes, markers, report.

Layout of STORE (every node is Zarr v3 with dimension names, so `zarr.open_group(STORE)` and
`xarray.open_zarr(STORE)` read it without a warning; see `store_nodes`):

    codes | codes_<level>...   (sample, h, w) uint16/uint32   — or `latents` (sample, ...) float16
    keys                       (sample,) str, "" on padding rows
    labels                     (sample,) int64, -1 when none / padding
    valid                      (sample,) bool: the row holds a good sample (driver-written at finalize)
    shards/{url,split,row_start,capacity,count}   (input_shard,) one entry per input shard
    codebook_counts[_<level>]  (code,) int64 per-code counts over the whole dataset (driver-written)
    markers                    group whose attributes name the run that created the store (its
                               claim, written first and only if absent)
    markers/<unit>             a group per finished work unit (see `layout`); its attributes are
                               each of its input shards' results (rows, corrupt samples, code
                               counts). Written by the unit's writer only after its rows are committed.
    report                     group whose attributes list every corrupt sample (key, shard, reason)

Creation is safe with several drivers at once and resumable: a driver claims the store
(`markers/zarr.json`, create-if-absent), writes every other node as whole objects (the same bytes
for the same run; nothing is deleted) and commits the root `zarr.json` last, create-if-absent.
A store without the root is half-created: the next run with the same identity completes it.

Input shard i owns rows [row_start, row_start + capacity) (see `layout`); its good samples
fill the first `count` rows in tar order. Only the driver writes attributes and the small
driver arrays, before any writer starts (create) and after all have finished (finalize).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import fsspec
import numpy as np
import zarr

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime import faults
from tokenmill.pipeline.runtime.redaction import redact
from tokenmill.pipeline.tokens import store_code_stats, store_nodes
from tokenmill.pipeline.tokens.layout import Layout, WorkUnit
from tokenmill.pipeline.tokens.objects import is_local, put_object, put_objects
from tokenmill.pipeline.tokens.store_format import FORMAT_VERSION, MARKERS, REPORT, ArraySpec
from tokenmill.pipeline.tokens.store_nodes import valid_chunk_rows

# Lineage entries that may differ between runs writing one store: the same weights reached by
# another URI (runs:/ vs models:/name@alias), the same manifest under another URL, or a newer
# tokenmill produce the same tokens.
# Labels: where the model and data were found, not what they are (the weights' and config's sha256
# are identity): a rerun may name the same model by another path, folder or registry.
_LINEAGE_LABELS = ("model_uri", "model_version", "model_source", "data", "tokenmill_version")


def tokenmill_version() -> str:
    try:
        return version("tokenmill")
    except PackageNotFoundError:
        return "unknown"


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
        self.opened_at = time.time()

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
        if not self.exists() and self.fs.exists(f"{self.root}/{MARKERS}/zarr.json"):
            raise UserError(f"{self.url} is a half-created token store (its creating run stopped before the "
                            "commit); rerun the same `tokenmill tokenize` to complete it")
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
        """Create the store (completing a half-created one), or check that the existing one was
        made by the same model and config (else UserError naming both, unless `overwrite`).
        Several drivers may call this at once. The lineage is recorded redacted."""
        lineage = redact(lineage)
        self.fs.invalidate_cache()  # s3fs caches listings; another driver may have written since
        if self.fs.isfile(self.root):
            raise UserError(f"{self.url} is a file; the token store must be a folder (choose another --out)")
        if overwrite and self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        attrs = {
            "tokenmill": {"format": FORMAT_VERSION, "state": "open"},
            "lineage": lineage,
            "layout": layout.to_dict(),
            "arrays": [_spec_json(s) for s in specs],
        }
        if not self.exists():
            self._create(attrs, layout, specs)
        self._check_same_run(self.attrs(), lineage, layout, specs)

    def _check_same_run(self, attrs: dict, lineage: dict, layout: Layout, specs: list[ArraySpec]) -> None:
        found = attrs.get("tokenmill", {}).get("format")
        if found is None:
            raise UserError(f"{self.url} is not a tokenmill token store; choose another --out or pass --overwrite")
        if found != FORMAT_VERSION:
            raise UserError(f"{self.url} is a token store of format {found}, older than this tokenmill's "
                            f"{FORMAT_VERSION}; pass --overwrite to rewrite it or choose another --out")
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

    def _create(self, attrs: dict[str, Any], layout: Layout, specs: list[ArraySpec]) -> None:
        """Claim, write every node, commit the root. A driver that loses the claim to a run with
        the same identity writes the same bytes (a crashed creator's store gets completed); one
        that loses the root commit resumes the store the winner committed."""
        claim = {"identity": _identity_hash(attrs), "creator": _describe_lineage(attrs["lineage"])}
        objects = store_nodes.build(attrs, claim, layout, specs)
        self._claim(objects.pop(f"{MARKERS}/zarr.json"), claim)
        root = objects.pop("zarr.json")
        put_objects(self.fs, {f"{self.root}/{key}": data for key, data in objects.items()})
        faults.hit("store.create")  # tests: die with every node written but the root
        put_object(self.fs, f"{self.root}/zarr.json", root, exclusive=True)

    def _claim(self, data: bytes, claim: dict[str, Any]) -> None:
        """Own the creation of this store, or share it with a run of the same identity."""
        path = f"{self.root}/{MARKERS}/zarr.json"
        # List before looking for the claim: a creator writes its claim before any other node.
        entries = {p.rstrip("/").rsplit("/", 1)[-1] for p in self._list_root()} - {MARKERS}
        if not self.fs.exists(path) and entries:
            raise UserError(f"{self.url} holds other files (e.g. {sorted(entries)[0]}) but no token store; "
                            "choose another --out or pass --overwrite to replace them")
        if put_object(self.fs, path, data, exclusive=True):
            return
        theirs = json.loads(self.fs.cat_file(path)).get("attributes", {})
        if theirs.get("identity") != claim["identity"]:
            raise UserError(f"{self.url} is being created by another run ({theirs.get('creator', '?')}), or such a "
                            f"run died while creating it; this run uses {claim['creator']}. Wait and rerun, or "
                            "pass --overwrite to replace it")

    def _list_root(self) -> list[str]:
        try:
            return self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []

    def _remove_stale_partial_files(self) -> None:
        """zarr's local store writes `<key>.<uuid>.partial` then renames; a killed writer leaves
        the temp file behind (the data it was writing is rewritten by the rerun). Only files older
        than this driver are removed: a concurrent driver's writer may be filling a younger one."""
        if not is_local(self.fs):
            return
        for path in self.fs.glob(f"{self.root}/**/*.partial"):
            try:
                if self.fs.modified(path).timestamp() < self.opened_at:
                    self.fs.rm(path)
            except FileNotFoundError:  # renamed meanwhile
                pass

    # ------------------------------------------------------------------ driver: progress / finalize
    def finished(self) -> dict[int, dict[str, Any]]:
        """The result of every finished input shard (rows, corrupt, code_counts, worker), by
        shard index, from the markers of the finished units."""
        self.fs.invalidate_cache()  # s3fs would answer from an earlier listing of markers/
        paths = sorted(self.fs.glob(f"{self.root}/{MARKERS}/*/zarr.json"))
        if not paths:
            return {}
        blobs = self.fs.cat(paths)
        done = {}
        for path in paths:
            attrs = json.loads(blobs[path])["attributes"]
            for shard in attrs.get("shards", [attrs]):  # format 2: one input shard per marker
                done[int(shard["shard"])] = {**shard, "worker": attrs.get("worker", {})}
        return done

    def finalize(self, layout: Layout, specs: list[ArraySpec]) -> dict[str, Any]:
        """After every marker exists: per-shard counts, `valid`, merged codebook counts, the
        report, the summary attributes and the consolidated root. Deterministic (merges in shard
        order, no timestamps) and writing data into existing nodes only, so two drivers
        finalizing at once write the same bytes."""
        done = self.finished()
        missing = [s.url for s in layout.shards if s.index not in done]
        if missing:
            raise RuntimeError(f"{len(missing)} input shards are not finished, e.g. {missing[0]}")
        group = self.open_group("r+")
        ordered = [done[s.index] for s in layout.shards]
        counts = np.array([m["rows"] for m in ordered], dtype=np.int64)
        group["shards/count"][:] = counts
        _write_valid(group["valid"], layout, counts)
        codebook = {}
        for spec in specs:
            if spec.codebook_size is None:
                continue
            total = np.zeros(spec.codebook_size, dtype=np.int64)
            for marker in ordered:
                total += store_code_stats.from_sparse(marker["code_counts"][spec.name], spec.codebook_size)
            group[spec.counts_name][:] = total
            codebook[spec.name] = store_code_stats.summarize(total)
        corrupt = [dict(item, shard=s.url) for s, m in zip(layout.shards, ordered) for item in m["corrupt"]]
        group[REPORT].attrs.put({"samples": int(counts.sum()), "corrupt_count": len(corrupt), "corrupt": corrupt})
        splits: dict[str, int] = {}
        for s, n in zip(layout.shards, counts.tolist()):
            splits[s.split] = splits.get(s.split, 0) + n
        summary = {"samples": int(counts.sum()), "corrupt": len(corrupt), "splits": splits, "codebook": codebook}
        group.attrs.update({"tokenmill": {"format": FORMAT_VERSION, "state": "complete"}, "summary": summary})
        put_object(self.fs, f"{self.root}/zarr.json",
                   store_nodes.consolidated_root(_zarr_kwargs(self.url, self.storage_options)))
        self._remove_stale_partial_files()
        return summary

    def item_rows(self, split: str | None = None) -> np.ndarray:
        """Store rows of the good samples (of one split) in item order: each input shard's
        first `count` rows, shards in manifest order. Needs a finished store."""
        table = self.open_group("r")["shards"]
        starts, counts, splits = table["row_start"][:], table["count"][:], table["split"][:]
        if (counts < 0).any():
            raise UserError(f"{self.url} is not finished; rerun `tokenmill tokenize` to complete it")
        if split is not None and split not in set(splits.tolist()):
            raise UserError(f"{self.url} has no split {split!r}; its splits: {', '.join(sorted(set(splits.tolist())))}")
        keep = np.ones(len(starts), bool) if split is None else splits == split
        return np.concatenate([np.arange(s, s + n) for s, n in zip(starts[keep], counts[keep])] or [np.empty(0, int)])

    # ------------------------------------------------------------------ writers (one per work unit)
    def writer(self, unit: WorkUnit, rows_per_zarr_shard: int, specs: list[ArraySpec]) -> "RegionWriter":
        return RegionWriter(self, unit, rows_per_zarr_shard, specs)

    def write_marker(self, unit: WorkUnit, results: list[dict[str, Any]], worker: dict[str, str] | None = None) -> None:
        """Called after the unit's rows are committed: its existence means "done". `results`:
        one dict per input shard of the unit (rows, corrupt, code_counts), in order."""
        shards = [{"shard": s.index, "url": s.url, **r} for s, r in zip(unit.shards, results, strict=True)]
        attrs = {"unit": unit.index, "shards": shards, "worker": worker or {}}
        # A whole-object put, never zarr's overwrite (which deletes first): a concurrent driver's
        # writer of the same unit may be writing the same marker.
        put_object(self.fs, f"{self.root}/{MARKERS}/{unit.index:06d}/zarr.json", store_nodes.group_json(attrs))


class RegionWriter:
    """Appends one work unit's good samples, input shard by input shard, and writes them one
    whole Zarr shard at a time, so memory stays at one Zarr shard and every object is written
    whole by this writer only. `end_shard()` pads the current input shard to its capacity;
    `close()` pads the last Zarr shard and rewrites any remaining one as fill, which also
    replaces whatever an earlier, killed attempt left there."""

    def __init__(self, store: TokenStore, unit: WorkUnit, rows_per_zarr_shard: int, specs: list[ArraySpec]):
        group = store.open_group("r+")
        self.arrays = {name: group[name] for name in [s.name for s in specs] + ["keys", "labels"]}
        self.unit, self.rows_per_zarr_shard = unit, rows_per_zarr_shard
        self.pending: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}
        self.pending_rows = 0
        self.next_row = unit.row_start  # first row of the Zarr shard being filled
        self.current, self.rows = 0, 0  # the input shard being appended to, and its good rows so far
        self.shard_rows: list[int] = []  # good rows of every ended input shard

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """columns: every token array (n, ...) plus keys (n,) str and labels (n,) int64, of the
        current input shard."""
        n, shard = len(columns["keys"]), self.unit.shards[self.current]
        if self.rows + n > shard.capacity:
            raise UserError(f"{shard.url} holds more samples than its manifest lists "
                            f"({shard.count}); rebuild the manifest with `tokenmill shard index`")
        self._add(columns, n)

    def end_shard(self) -> int:
        """End the current input shard (fill rows up to its capacity); returns its good rows."""
        shard, rows = self.unit.shards[self.current], self.rows
        if self.current < len(self.unit.shards) - 1:  # the last one's tail is padded by `close`
            self._add({name: self._fill(arr, shard.capacity - rows) for name, arr in self.arrays.items()},
                      shard.capacity - rows)
        self.shard_rows.append(rows)
        self.current, self.rows = self.current + 1, 0
        return rows

    def close(self) -> list[int]:
        """End the remaining input shards, write the rest (padded) and blank the unused tail of
        the unit's range; returns the good rows of each input shard."""
        while self.current < len(self.unit.shards):
            self.end_shard()
        end = self.unit.row_start + self.unit.capacity
        while self.next_row < end:
            self._flush(self.pending_rows)
        return self.shard_rows

    def _add(self, columns: dict[str, np.ndarray], n: int) -> None:
        for name in self.arrays:
            self.pending[name].append(columns[name])
        self.pending_rows += n
        self.rows += n
        while self.pending_rows >= self.rows_per_zarr_shard:
            self._flush(self.rows_per_zarr_shard)

    @staticmethod
    def _fill(arr: zarr.Array, n: int) -> np.ndarray:
        return np.full((n, *arr.shape[1:]), arr.fill_value, dtype=_np_dtype(arr))

    def _flush(self, n: int) -> None:
        """Write the first n pending rows, padded with fill values, as the next whole Zarr shard."""
        lo, hi = self.next_row, self.next_row + self.rows_per_zarr_shard
        for name, arr in self.arrays.items():
            parts = self.pending[name]
            data = np.concatenate(parts) if parts else np.empty((0, *arr.shape[1:]), dtype=_np_dtype(arr))
            block = self._fill(arr, self.rows_per_zarr_shard)
            block[:n] = data[:n]
            arr[lo:hi] = block
            self.pending[name] = [data[n:]] if len(data) > n else []
        self.pending_rows -= n
        self.next_row = hi


def _np_dtype(arr: zarr.Array) -> Any:
    return object if arr.dtype.kind == "T" else arr.dtype


def _write_valid(valid: zarr.Array, layout: Layout, counts: np.ndarray) -> None:
    """valid[row] = the row holds a good sample (each input shard's first `count` rows); written
    a whole chunk at a time, so memory stays bounded at any store size."""
    starts = np.array([s.row_start for s in layout.shards], dtype=np.int64)
    ends = starts + counts
    step = valid_chunk_rows(layout)
    for lo in range(0, layout.rows, step):
        hi = min(lo + step, layout.rows)
        edges = np.zeros(hi - lo + 1, dtype=np.int64)
        np.add.at(edges, np.clip(starts, lo, hi) - lo, 1)
        np.add.at(edges, np.clip(ends, lo, hi) - lo, -1)
        valid[lo:hi] = np.cumsum(edges)[:-1] > 0


def _spec_json(spec: ArraySpec) -> dict[str, Any]:
    return {**asdict(spec), "row_shape": list(spec.row_shape)}


def _identity(run: dict[str, Any]) -> dict[str, Any]:
    """What must match to resume: everything but the labels in `_LINEAGE_LABELS`."""
    lineage = {k: v for k, v in run["lineage"].items() if k not in _LINEAGE_LABELS}
    return {**lineage, "layout": run["layout"], "arrays": run["arrays"]}


def _identity_hash(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_identity(run), sort_keys=True, default=str).encode()).hexdigest()


def _describe_lineage(lineage: dict[str, Any]) -> str:
    sha = str(lineage.get("weights_sha256", "?"))[:12]
    return f"model {lineage.get('model_uri', '?')} (weights sha256 {sha}…, {lineage.get('mode', '?')})"


def describe_store(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `tokenmill inspect STORE` prints: levels, arrays (shape, dtype, chunks, shards), lineage,
    progress, sample counts per split and codebook statistics."""
    store = TokenStore(url, storage_options)
    attrs = store.token_attrs()
    group = store.open_group("r")
    names = [spec["name"] for spec in attrs["arrays"]] + ["keys", "labels"] + (["valid"] if "valid" in group else [])
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
        "levels": attrs["arrays"],  # the token arrays (codes or latents per level): name, row shape, dtype
        "arrays": arrays,
        "input_shards": {"total": int(group["shards/url"].shape[0]), "finished": len(done)},
        "summary": attrs.get("summary"),
        "corrupt": report.get("corrupt", []),
    }
