"""The tokenize job's Ray Data actor: holds the model, encodes one work unit per call.

Each call writes the unit's rows and then its marker (`pipeline.tokens.encode_unit`), retrying
the whole unit on transient storage errors; a permanent one comes back in the `error` column
(a UserError raised in a Ray Data actor reaches the driver as a traceback).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tokenmill.pipeline.tokenize.options import TokenizeOptions
from tokenmill.pipeline.tokenize.pool import PoolPlan


class ShardEncoderActor:
    """A Ray Data actor: loads the model once, then encodes one work unit per call."""

    def __init__(self, files_ref, store_url: str, rows_per_zarr_shard: int, options: TokenizeOptions, plan: PoolPlan):
        import ray
        import torch

        from tokenmill.models.errors import UserError
        from tokenmill.pipeline.runtime import faults
        from tokenmill.pipeline.tokens.extraction import load_tokenizer
        from tokenmill.pipeline.tokens.store import TokenStore

        faults.install_from_env()  # tests: storage faults in this actor (the driver forwards the variable)
        use_gpu = bool(plan.num_gpus)
        if use_gpu and not torch.cuda.is_available():
            raise UserError("tokenize planned GPU actors (--gpus or the cluster's GPUs), but this node's torch "
                            "sees no CUDA device; install a CUDA build of torch or pass --gpus 0")
        if not use_gpu:  # intra-op threads = the CPUs Ray reserved for this actor: no oversubscription
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.encoder = load_tokenizer(ray.get(files_ref[0]), options.extraction, "cuda" if use_gpu else "cpu",
                                      options.precision)
        self.store = TokenStore(store_url, options.storage_options)
        self.rows_per_zarr_shard, self.batch_size = rows_per_zarr_shard, options.batch_size
        self.options, self.decode_threads = options.storage_options, plan.decode_threads
        self.worker = {"node": ray.get_runtime_context().get_node_id()}  # in each marker: who wrote the unit

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from tokenmill.pipeline.runtime.storage_retry import StorageError, retry_storage
        from tokenmill.pipeline.tokens.encode_unit import encode_unit
        from tokenmill.pipeline.tokens.layout import WorkUnit

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
