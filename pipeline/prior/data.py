"""What a prior's ranks read from a token store, and in which order.

Every rank opens the store itself (`TokenDataset`; no Ray, no MLflow here) and reads only its own
batches. Epoch `e` has one permutation of the split's items, seeded by (seed, e), so every rank
computes the same one and a resumed run recomputes it from the checkpoint's (epoch, batch):

  * a split that fits in `data.cache_mb` is read once into memory and permuted per item;
  * a bigger split streams through TokenDataset's chunk cache with a *chunk-level* shuffle: the
    chunks' order is permuted, then items are permuted within windows of `shuffle_window_chunks`
    consecutive chunks, so a batch touches a few cached chunks, never random rows of object storage.
    A window's chunks are fetched `read_threads` at once, a remote store's through a folder the
    node's ranks share (`node_cache_dir`: every rank needs the same chunks in the same order).

Batches are read `prefetch_batches` ahead by a thread while the step runs (the order is the one
computed here, so prefetching changes nothing a resume recomputes).

The permutation is cut into global batches of `world_size * batch_size` items, and global batch
`b` gives rank `r` its `r`-th slice of `batch_size` items. Within an epoch no item is read twice,
on one rank or across ranks. The last `items mod (world_size * batch_size)` items of each epoch's
permutation are dropped, so every rank takes the same number of equal batches (DDP needs lockstep);
the permutation changes every epoch, so the dropped items differ from epoch to epoch. A resume must
keep `world_size` and `batch_size`: batch `b` of an epoch is defined by both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.dataset import TokenDataset
from tokenmill.pipeline.tokens.node_cache import default_folder
from tokenmill.pipeline.tokens.prefetch import prefetch

MIB = 1 << 20


def open_split(data, split: str, num_classes: int) -> TokenDataset:
    """The split as the prior's sequences: [BOS, class token (when num_classes > 0), codes...]."""
    return TokenDataset(data.store, split, add_bos=True, class_token=num_classes > 0, num_classes=num_classes,
                        storage_options=data.storage_options, cache_bytes=int(data.cache_mb * MIB),
                        read_threads=data.read_threads, node_cache_dir=data.node_cache_dir or default_folder(),
                        node_cache_bytes=int(data.node_cache_mb * MIB))


@dataclass(frozen=True)
class StoreVocab:
    """What a prior must match in a code store: codebook size, code grid per level, classes."""

    codebook_size: int
    grid: list[list[int]]  # [[h, w]] per level, in the store's (and TokenDataset's) order
    num_classes: int  # labels 0..num_classes-1 appear; 0 when the store has no labels


def store_vocab(dataset: TokenDataset) -> StoreVocab:
    grid = [list(spec["row_shape"]) for spec in dataset.specs]
    if any(len(shape) != 2 for shape in grid):
        raise UserError(f"{dataset.store.url} holds codes of shapes {grid}; a prior needs (h, w) grids")
    labels = dataset.store.open_group("r")["labels"][:]
    return StoreVocab(dataset.codebook_size, grid, int(max(labels.max(initial=-1), -1)) + 1)


def resolve_model_fields(model, vocab: StoreVocab) -> dict[str, Any]:
    """`prior_config` keyword arguments: the fields the config's `model` section sets (its kind's
    defaults fill in the rest) with the vocabulary, grid and classes the store has filled in; a
    value given in the config must agree with the store."""
    fields = model.config_fields()
    for name, value in (("codebook_size", vocab.codebook_size), ("grid", vocab.grid)):
        if fields.get(name) is None:
            fields[name] = value
        elif fields[name] != value:
            raise UserError(f"model.{name} is {fields[name]} but the store has {value}; leave it out to use the store's")
    if fields.get("num_classes") is None:
        fields["num_classes"] = vocab.num_classes
    elif 0 < fields["num_classes"] < vocab.num_classes:
        raise UserError(f"model.num_classes is {fields['num_classes']} but the store has labels up to "
                        f"{vocab.num_classes - 1}; raise it, or set 0 for an unconditional prior")
    return fields


def epoch_order(items: int, seed: int, epoch: int, chunk_of: np.ndarray | None = None,
                window_chunks: int = 16) -> np.ndarray:
    """A permutation of range(items) for `epoch`, the same on every rank. `chunk_of` (items,): the
    store chunk of each item; given, the shuffle is chunk-level (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    if chunk_of is None:
        return rng.permutation(items)
    chunks = np.unique(chunk_of)
    position = np.empty(int(chunks.max()) + 1, dtype=np.int64)
    position[rng.permutation(chunks)] = np.arange(len(chunks))  # chunk -> its place in this epoch
    place = position[chunk_of]  # (items,)
    window = place // window_chunks
    # Primary key: the item's window; secondary: a random draw, i.e. a shuffle inside each window.
    return np.lexsort((rng.random(items), window))


@dataclass(frozen=True)
class Partition:
    """Global batch `b` of an epoch's order: items [b*W*B, (b+1)*W*B); rank r's share is the r-th
    B of them. The remainder of an epoch (< W*B items) is dropped."""

    items: int
    world_size: int
    batch_size: int

    @property
    def batches_per_epoch(self) -> int:
        return self.items // (self.world_size * self.batch_size)

    def rank_batch(self, order: np.ndarray, batch: int, rank: int) -> np.ndarray:
        start = (batch * self.world_size + rank) * self.batch_size
        return order[start : start + self.batch_size]


class TrainBatches:
    """This rank's training batches, epoch by epoch: `epoch(e, start)` yields (batch index,
    {"tokens": (B, prefix + N) int64, "labels": (B,) int64}) from batch `start` on, read
    `prefetch_batches` ahead by a background thread (`pipeline.tokens.prefetch`; the same batches
    in the same order) that owns the dataset while the epoch's iterator is open."""

    def __init__(self, dataset: TokenDataset, split: str, rank: int, world_size: int, batch_size: int,
                 seed: int, window_chunks: int, prefetch_batches: int = 0):
        self.dataset, self.rank, self.seed, self.window_chunks = dataset, rank, seed, window_chunks
        self.prefetch_batches = prefetch_batches
        self.partition = Partition(len(dataset), world_size, batch_size)
        if self.partition.batches_per_epoch == 0:
            raise UserError(f"the {split!r} split has {len(dataset)} items, fewer than one global batch "
                            f"({world_size} workers x {batch_size}); lower train.batch_size")
        self.chunk_of = None if dataset.resident else item_chunks(dataset, split)

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.dataset), self.seed, epoch, self.chunk_of, self.window_chunks)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        yield from prefetch(self._read(epoch, start), self.prefetch_batches, name=f"prior-batches-rank{self.rank}")

    def _read(self, epoch: int, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        order = self.order(epoch)
        for batch in range(start, self.partition.batches_per_epoch):
            indices = self.partition.rank_batch(order, batch, self.rank)
            yield batch, {"indices": indices, **self.dataset.batch(indices)}


def item_chunks(dataset: TokenDataset, split: str) -> np.ndarray:
    """(items,) the store chunk (of the token arrays, which share chunk rows) holding each item."""
    rows = dataset.store.item_rows(split)
    chunk_rows = dataset.store.open_group("r")[dataset.specs[0]["name"]].chunks[0]
    return rows // chunk_rows


def val_batches(dataset: TokenDataset, rank: int, world_size: int, batch_size: int,
                max_items: int | None = None) -> Iterator[dict[str, Any]]:
    """This rank's share of the validation items (every world_size-th of the first `max_items`, in
    store order): all of them, none twice; ranks may get one item more or less (forward only)."""
    mine = np.arange(min(len(dataset), max_items or len(dataset)))[rank::world_size]
    for start in range(0, len(mine), batch_size):
        yield dataset.batch(mine[start : start + batch_size])
