"""The tokenize job's Ray driver: a whole sharded dataset into a Zarr token store.

The driver resolves the model and the manifest, plans every input shard's row range, creates
(or checks the lineage of) the store, then streams the unfinished work units (one input shard
each, or a few consecutive ones in stores of very many: `pipeline.tokens.layout`) through a Ray
Data actor pool; each actor holds the model and writes its unit's rows and marker
(`pipeline.tokens.encode_unit`). Finally the driver merges the markers into the
report and codebook statistics. Killed anywhere, the same command resumes and ends with the
same arrays. This module joins the shard and token subsystems; `pipeline.tokens` itself never
imports Ray.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any


@dataclasses.dataclass
class TokenizeSummary:
    """What a tokenization produced; `to_json()` is what `tokenmill tokenize --json` writes."""

    samples: int  # good samples in the store (all shards, also those done by an earlier run)
    corrupt: int  # samples skipped as unreadable
    splits: dict[str, int]  # samples per split
    codebook: dict[str, Any]  # per code array: usage statistics
    store: str
    lineage: dict[str, Any]
    encoded_now: int  # samples this run encoded
    seconds: float  # this run's encoding wall-clock time
    img_per_s: float
    startup_s: float  # actor start (process, imports, model load) until the first shard began
    skipped_shards: int  # input shards found finished
    input_shards: int
    finalize_s: float = 0.0  # the driver merging markers into counts, report and codebook statistics

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tokenize_dataset(
    model_ref: str, shards_url: str, store_url: str, *, batch_size: int = 256, overwrite: bool = False,
    latents: bool | str = False, actors: int | None = None, tracking_uri: str | None = None,
    storage_options: dict[str, Any] | None = None, size: int | None = None, crop: str | None = None,
    augment: str | None = None, gpus: int | None = None, precision: str = "fp32", decode_threads: int | None = None,
) -> TokenizeSummary:
    """Tokenize every shard listed by `shards_url`'s manifest into the store at `store_url`.
    `latents`: False (codes), True/"mean" or "sample"; `size`/`crop` (diffusers models) and
    `augment`: see `pipeline.tokens.extraction`. `gpus`/`actors`/`decode_threads` shape the actor
    pool (`pipeline.tokenize.pool.plan_pool`); `precision` is the encoder's autocast dtype."""
    from models.errors import UserError
    from pipeline.runtime.storage_retry import retry_storage
    from pipeline.tokens.extraction import ExtractionOptions, load_tokenizer, resolve_tokenizer, tokenizer_lineage
    from pipeline.tokens.layout import plan_layout
    from pipeline.tokens.store import TokenStore, tokenmill_version

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if actors is not None and actors < 1:
        raise UserError(f"--actors must be >= 1, got {actors}")
    if gpus is not None and gpus < 0:
        raise UserError(f"--gpus must be >= 0, got {gpus}")
    if decode_threads is not None and decode_threads < 1:
        raise UserError(f"--decode-threads must be >= 1, got {decode_threads}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    options = dict(storage_options or {})
    extraction = ExtractionOptions.build(latents, size, crop, augment)
    files = resolve_tokenizer(model_ref, tracking_uri, options)
    shards, identity = _manifest_shards(shards_url, options)
    encoder = load_tokenizer(files, extraction)  # on the driver only to learn the arrays' shapes
    layout = plan_layout([(s["url"], s["split"], s["count"]) for s in shards],
                         max(spec.row_bytes for spec in encoder.specs))
    lineage = {
        **tokenizer_lineage(files, encoder, extraction),
        "manifest_identity": identity, "data": shards_url, "tokenmill_version": tokenmill_version(),
    }
    store = TokenStore(store_url, options)
    retry_storage(lambda: store.prepare(lineage, layout, encoder.specs, overwrite), what="creating the store", url=store_url)
    done = retry_storage(store.finished, what="reading the store's markers", url=store_url)
    pending = [u for u in layout.units if any(s.index not in done for s in u.shards)]
    started = time.time()
    pool = dict(actors=actors, gpus=gpus, decode_threads=decode_threads, precision=precision)
    encoded, first_unit = _run_actors(pending, store, layout.rows_per_zarr_shard, files, extraction, batch_size,
                                      options, pool)
    seconds = time.time() - started
    stored = retry_storage(lambda: store.finalize(layout, encoder.specs), what="finalizing the store", url=store_url)
    finalize_s = time.time() - started - seconds
    return TokenizeSummary(
        samples=stored["samples"], corrupt=stored["corrupt"], splits=stored["splits"], codebook=stored["codebook"],
        store=store_url, lineage=lineage, encoded_now=encoded, seconds=seconds,
        img_per_s=encoded / seconds if seconds > 0 else 0.0,
        startup_s=max(0.0, first_unit - started),  # a fixed cost per job
        skipped_shards=len(done), input_shards=len(layout.shards), finalize_s=finalize_s,
    )


def _manifest_shards(shards_url: str, options: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Manifest shard entries with absolute URLs (indexing and writing the manifest when it is
    missing) and the manifest's identity, which decides the store's contents."""
    from models.errors import UserError
    from pipeline.runtime.storage import join
    from pipeline.shards.manifest import index_shards, manifest_identity, manifest_url, read_manifest, write_manifest

    manifest = read_manifest(shards_url, options)
    if manifest is None:
        manifest, _ = index_shards(shards_url, options)
        write_manifest(shards_url, manifest, options)
    if not manifest["shards"]:
        raise UserError(f"{manifest_url(shards_url)} lists no shards")
    folder = manifest_url(shards_url).rsplit("/", 1)[0]
    return [dict(s, url=join(folder, s["url"])) for s in manifest["shards"]], manifest_identity(manifest)


def _run_actors(pending, store, rows_per_zarr_shard, files, extraction, batch_size, options, pool) -> tuple[int, float]:
    """Encode `pending` work units on a Ray Data actor pool (shaped by `pool`: actors, gpus,
    decode_threads, precision); returns the samples encoded and the time the first unit began."""
    if not pending:
        return 0, time.time()
    import ray
    from tqdm import tqdm

    from pipeline.runtime import faults
    from pipeline.runtime.ray_connection import ensure_ray, quiet_ray_data_logs
    from pipeline.tokenize.pool import local_cores, plan_pool

    ensure_ray()
    # The bar below reports progress; Ray Data's own bars and per-run INFO lines would repeat it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data_logs()
    # The driver may sit on a CPU head node: decide from the cluster, not from this process's torch.
    plan = plan_pool(ray.cluster_resources(), len(pending), gpus=pool["gpus"], actors=pool["actors"],
                     decode_threads=pool["decode_threads"], local_cores=local_cores())
    items = [{"unit": json.dumps(u.to_json())} for u in pending]
    fault_env = faults.env_vars()  # tests: actors do not inherit this process's environment
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoderActor, batch_size=1, compute=ray.data.ActorPoolStrategy(**plan.strategy_kwargs()),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
        fn_constructor_kwargs=dict(
            files_ref=[ray.put(files)], store_url=store.url, rows_per_zarr_shard=rows_per_zarr_shard,
            extraction=extraction, batch_size=batch_size, storage_options=options, use_gpu=bool(plan.num_gpus),
            precision=pool["precision"], decode_threads=plan.decode_threads,
        ),
        **({"runtime_env": {"env_vars": fault_env}} if fault_env else {}),
    )
    encoded, first_unit, failed = 0, float("inf"), []
    with tqdm(total=sum(len(u.shards) for u in pending), desc="tokenize", unit="shard", file=sys.stderr) as bar:
        for row in ds.iter_rows():
            failed += [row["error"]] if row["error"] else []  # the other units still finish: a rerun does less
            encoded += int(row["rows"])
            first_unit = min(first_unit, float(row["started"]))
            bar.update(int(row["shards"]))
    if failed:
        from pipeline.runtime.storage_retry import StorageError

        raise StorageError(failed[0] + (f" ({len(failed) - 1} more work units failed)" if len(failed) > 1 else ""))
    return encoded, first_unit


class ShardEncoderActor:
    """A Ray Data actor: loads the model once, then encodes one work unit per call."""

    def __init__(self, files_ref, store_url, rows_per_zarr_shard, extraction, batch_size, storage_options,
                 use_gpu=False, precision="fp32", decode_threads=1):
        import ray
        import torch

        from models.errors import UserError
        from pipeline.runtime import faults
        from pipeline.tokens.extraction import load_tokenizer
        from pipeline.tokens.store import TokenStore

        faults.install_from_env()  # tests: storage faults in this actor (the driver forwards the variable)
        if use_gpu and not torch.cuda.is_available():
            raise UserError("tokenize planned GPU actors (--gpus or the cluster's GPUs), but this node's torch "
                            "sees no CUDA device; install a CUDA build of torch or pass --gpus 0")
        if not use_gpu:  # intra-op threads = the CPUs Ray reserved for this actor: no oversubscription
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.encoder = load_tokenizer(ray.get(files_ref[0]), extraction, "cuda" if use_gpu else "cpu", precision)
        self.store = TokenStore(store_url, storage_options)
        self.rows_per_zarr_shard, self.batch_size, self.options = rows_per_zarr_shard, batch_size, storage_options
        self.decode_threads = decode_threads
        self.worker = {"node": ray.get_runtime_context().get_node_id()}  # in each marker: who wrote the unit

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pipeline.runtime.storage_retry import StorageError, retry_storage
        from pipeline.tokens.encode_unit import encode_unit
        from pipeline.tokens.layout import WorkUnit

        started = time.time()
        unit = WorkUnit.from_json(json.loads(batch["unit"][0]))
        shard = unit.shards[0]
        what = f"input shard {shard.index} ({shard.url})" if len(unit.shards) == 1 else (
            f"work unit {unit.index} (input shards {shard.index}-{unit.shards[-1].index}, from {shard.url})")
        try:  # a unit's rows and marker are rewritten whole, so a transient storage error reruns the unit
            results = retry_storage(lambda: encode_unit(unit, self.store, self.rows_per_zarr_shard, self.encoder,
                                                        self.batch_size, self.options, self.worker,
                                                        self.decode_threads),
                                    what=what, url=self.store.url)
        except StorageError as err:  # the driver reports it: a UserError raised here reaches it as a traceback
            return {"unit": [unit.index], "shards": [len(unit.shards)], "rows": [0], "started": [started],
                    "error": [str(err)]}
        return {"unit": [unit.index], "shards": [len(unit.shards)], "rows": [sum(r["rows"] for r in results)],
                "started": [started], "error": [""]}
