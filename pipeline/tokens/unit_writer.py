"""The writer thread of one work unit: device->host reads, code counts and Zarr writes, off the
encoder's thread, so the encoder never waits on storage.

The encoder's thread hands over launched batches (`PendingRows`: on CUDA their codes are still
travelling to the host) and input-shard ends through a bounded queue; this thread reads each
batch's rows, counts codes and appends them to the unit's `RegionWriter`, which writes whole
Zarr shards. `close()` waits for every write and the region's padding: only then may the caller
write the unit's marker (the commit). An error here is re-raised, as it was, in the caller's
next `put`/`end_shard`/`close` (so `retry_storage` and the actor see what a serial write raised).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np

from tokenmill.pipeline.tokens import store_code_stats
from tokenmill.pipeline.tokens.store import RegionWriter
from tokenmill.pipeline.tokens.store_format import ArraySpec

WRITE_AHEAD = 3  # launched batches waiting for this thread: bounds host (and device) memory


class UnitWriter:
    """`put(pending, labels, keys)` per batch and `end_shard(corrupt)` per input shard, in order,
    then `close()` -> each input shard's result (rows, corrupt, code_counts); `abort()` when the
    caller fails (stops the thread without closing the region: nothing is committed)."""

    def __init__(self, region: RegionWriter, specs: list[ArraySpec], depth: int = WRITE_AHEAD):
        self.region = region
        self.sizes = {s.name: s.codebook_size for s in specs if s.codebook_size}
        self.counts = self._zero_counts()
        self.results: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.stopping = False
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, daemon=True, name="unit-writer")
        self.thread.start()

    def put(self, pending, labels: np.ndarray, keys: list[str]) -> None:
        self._send(("rows", pending, labels, keys))

    def end_shard(self, corrupt: list[dict[str, str]]) -> None:
        self._send(("end", corrupt))

    def close(self) -> list[dict[str, Any]]:
        """Wait until every row is written and the region closed; re-raise this thread's error."""
        self._send(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.results

    def abort(self) -> None:
        """Stop the thread, dropping what is queued; a no-op once it has ended."""
        if self.thread.is_alive():
            self.stopping = True
            self.queue.put(None)  # the thread drains the queue, so this returns
            self.thread.join()

    def _send(self, item) -> None:
        while True:  # bounded waits: a failed writer must not leave the encoder blocked on a full queue
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None and not self.stopping:  # after an error: drain, so senders never block
                try:
                    self._handle(item)
                except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = err
        if self.error is None and not self.stopping:
            try:
                self.region.close()  # pads and writes the unit's last Zarr shard
            except BaseException as err:  # noqa: BLE001 - re-raised by close()
                self.error = err

    def _handle(self, item: tuple) -> None:
        if item[0] == "end":
            self.results.append({
                "rows": self.region.end_shard(),
                "corrupt": item[1],
                "code_counts": {name: store_code_stats.to_sparse(c) for name, c in self.counts.items()},
            })
            self.counts = self._zero_counts()
            return
        _, pending, labels, keys = item
        rows = pending.rows()  # on CUDA: waits for this batch's copy to the host only
        for name, size in self.sizes.items():
            self.counts[name] += store_code_stats.count_codes(rows[name], size)
        self.region.append({**rows, "keys": np.array(keys, dtype=object), "labels": labels})

    def _zero_counts(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(size, dtype=np.int64) for name, size in self.sizes.items()}
