"""The training stream without Ray: the rows `open_stream` gives, read in this process.

The same shard order per epoch, decoding, transform and per-shard buffer shuffle (all functions
of seed, epoch and key, from `pipeline.shards.stream`), then a local shuffle buffer and fixed-size
batches as Ray Data's `iter_torch_batches` gives them to a training rank. The engine's
`LocalContext` runs a whole training loop on it (one rank, no Ray): the unit tests of every task.
Skipped samples are counted in `errors`, as the Ray stream's ErrorLog counts them.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch

from tokenmill.pipeline.shards.stream import (
    StreamConfig,
    buffer_shuffle,
    check_shards,
    iter_shard_batches,
    shard_order,
    skip_report,
)


class LocalStream:
    def __init__(self, urls: list[str], config: StreamConfig | None = None, storage_options: dict | None = None):
        self.config = config or StreamConfig()
        check_shards(urls, storage_options)
        self.urls, self.storage_options = list(urls), storage_options
        self.epoch = 0
        self.errors: list[dict[str, str]] = []  # {"shard", "key", "reason"} of every skipped sample

    def report(self) -> dict[str, Any]:
        """The skip-and-count report, as the Ray stream's (`ShardStream.report`)."""
        return skip_report(sorted(self.errors, key=lambda r: (r["shard"], r["key"], r["reason"])))

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shard order, shuffle and augmentation the next pass reads."""
        self.epoch = epoch

    def rows(self) -> Iterator[tuple[np.ndarray, int]]:
        """(image uint8 (H, W, C), label) in this epoch's order."""
        for url in shard_order(self.urls, self.config.seed, self.epoch, self.config.shuffle):
            errors: list[dict[str, str]] = []
            for batch in iter_shard_batches(url, self.config, errors, epoch=self.epoch,
                                            storage_options=self.storage_options):
                yield from zip(batch["image"], batch["label"].tolist())
            self.errors += [e for e in errors if e not in self.errors]

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False, device: Any = None,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """{"image": uint8 (B, H, W, C), "label": int64 (B,)} batches, as Ray Data's method of that name."""
        rows: Iterator = self.rows()
        if local_shuffle_buffer_size:
            rows = buffer_shuffle(rows, local_shuffle_buffer_size, random.Random(local_shuffle_seed))
        batch: list[tuple[np.ndarray, int]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == batch_size:
                yield _to_torch(batch, device)
                batch = []
        if batch and not drop_last:
            yield _to_torch(batch, device)


def _to_torch(rows: list[tuple[np.ndarray, int]], device: Any) -> dict[str, torch.Tensor]:
    images = torch.from_numpy(np.stack([image for image, _ in rows]))
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    return {"image": images.to(device) if device else images, "label": labels.to(device) if device else labels}
