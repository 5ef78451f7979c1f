"""The tokenize job's Ray driver: a whole sharded dataset into a Zarr token store.

The driver resolves the model and the manifest, plans every input shard's row range, creates
(or checks the lineage of) the store, then streams the unfinished work units (one input shard
each, or a few consecutive ones in stores of very many: `pipeline.tokens.layout`) through a Ray
Data actor pool (`pipeline.tokenize.pool` plans it); each actor (`pipeline.tokenize.actor`) holds
the model and writes its unit's rows and marker (`pipeline.tokens.encode_unit`). Finally the
driver merges the markers into the report and codebook statistics. Killed anywhere, the same
command resumes and ends with the same arrays.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from tokenmill.pipeline.tokenize.options import TokenizeOptions

if TYPE_CHECKING:
    from tokenmill.pipeline.tokens.layout import WorkUnit
    from tokenmill.pipeline.tokens.store import TokenStore


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


def tokenize_dataset(model_ref: str, shards_url: str, store_url: str,
                     options: TokenizeOptions | None = None) -> TokenizeSummary:
    """Tokenize every shard listed by `shards_url`'s manifest into the store at `store_url`, as
    `options` say (checked when they were built; the defaults when None): the latent mode,
    preprocessing and augmentation (`pipeline.tokens.extraction`), the actor pool
    (`pipeline.tokenize.pool.plan_pool`) and the encoder's autocast precision."""
    from tokenmill.pipeline.registry.resolver import absolute_location, resolve_reference
    from tokenmill.pipeline.runtime.storage_retry import retry_storage
    from tokenmill.pipeline.tokens.extraction import load_tokenizer, tokenizer_lineage
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import TokenStore, tokenmill_version

    options = options or TokenizeOptions()
    # Actors of a running cluster (`ray start`, RAY_ADDRESS) work in another folder: paths relative
    # to this one must not reach them.
    shards_url, store_url = absolute_location(shards_url), absolute_location(store_url)
    files = resolve_reference(model_ref, options.tracking_uri, options.storage_options)
    shards, identity = _manifest_shards(shards_url, options.storage_options)
    # On the driver only to learn the arrays' shapes, and to refuse a precision the model cannot take
    encoder = load_tokenizer(files, options.extraction, precision=options.precision)
    layout = plan_layout([(s["url"], s["split"], s["count"]) for s in shards],
                         max(spec.row_bytes for spec in encoder.specs))
    lineage = {
        **tokenizer_lineage(files, encoder, options.extraction),
        "manifest_identity": identity, "data": shards_url, "tokenmill_version": tokenmill_version(),
    }
    store = TokenStore(store_url, options.storage_options)
    retry_storage(lambda: store.prepare(lineage, layout, encoder.specs, options.overwrite), what="creating the store",
                  url=store_url)
    done = retry_storage(store.finished, what="reading the store's markers", url=store_url)
    pending = [u for u in layout.units if any(s.index not in done for s in u.shards)]
    started = time.time()
    encoded, first_unit = _run_actors(pending, store, layout.rows_per_zarr_shard, files, options)
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
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.runtime.storage import join
    from tokenmill.pipeline.shards.manifest import (
        index_shards,
        manifest_identity,
        manifest_url,
        read_manifest,
        write_manifest,
    )

    manifest = read_manifest(shards_url, options)
    if manifest is None:
        manifest, _ = index_shards(shards_url, options)
        write_manifest(shards_url, manifest, options)
    if not manifest["shards"]:
        raise UserError(f"{manifest_url(shards_url)} lists no shards")
    folder = manifest_url(shards_url).rsplit("/", 1)[0]
    return [dict(s, url=join(folder, s["url"])) for s in manifest["shards"]], manifest_identity(manifest)


def _run_actors(pending: list[WorkUnit], store: TokenStore, rows_per_zarr_shard: int, files,
                options: TokenizeOptions) -> tuple[int, float]:
    """Encode `pending` work units on a Ray Data actor pool (planned from `options`' actors, gpus
    and decode threads); returns the samples encoded and the time the first unit began."""
    if not pending:
        return 0, time.time()
    import ray
    from tqdm import tqdm

    from tokenmill.pipeline.runtime import faults
    from tokenmill.pipeline.runtime.ray_connection import ensure_ray, quiet_ray_data_logs
    from tokenmill.pipeline.tokenize.actor import ShardEncoderActor
    from tokenmill.pipeline.tokenize.pool import local_cores, plan_pool

    ensure_ray()
    # The bar below reports progress; Ray Data's own bars and per-run INFO lines would repeat it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet_ray_data_logs()
    # The driver may sit on a CPU head node: decide from the cluster, not from this process's torch.
    plan = plan_pool(ray.cluster_resources(), len(pending), gpus=options.gpus, actors=options.actors,
                     decode_threads=options.decode_threads, local_cores=local_cores(),
                     nodes=[n["Resources"] for n in ray.nodes() if n.get("Alive")])
    items = [{"unit": json.dumps(u.to_json())} for u in pending]
    fault_env = faults.env_vars()  # tests: actors do not inherit this process's environment
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoderActor, batch_size=1, compute=ray.data.ActorPoolStrategy(**plan.strategy_kwargs()),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
        fn_constructor_kwargs=dict(files_ref=[ray.put(files)], store_url=store.url,
                                   rows_per_zarr_shard=rows_per_zarr_shard, options=options, plan=plan),
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
        from tokenmill.pipeline.runtime.storage_retry import StorageError

        raise StorageError(failed[0] + (f" ({len(failed) - 1} more work units failed)" if len(failed) > 1 else ""))
    return encoded, first_unit

