"""The one shard reader: every sample of a shard as decoded pixels, or as a `ShardError`.

    for item in read_shard(url, pixels_decoder(transform)):
        if isinstance(item, ShardError):   # {"shard", "key", "reason"}, reasons from problems.py
            ...
        else:                              # ShardSample: key, label, pixels (size, size, C) uint8
            ...

The training stream, tokenization, the manifest scan and `inspect --verify` all read shards
here, so one bad sample gets one report wherever it is read. The pipeline, per shard:
    tar bytes --tar_reader--> members --group by key (wds_io)--> samples (key, {ext: bytes})
      --pick the image member--> --decode(key, ext, bytes)--> ShardSample | ShardError
Damage to the tar ends the shard with one ShardError; every sample read before it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np

from tokenmill.pipeline.runtime.storage import filesystem
from tokenmill.pipeline.shards.images import DecodeError, Draw, TransformConfig, decode_image
from tokenmill.pipeline.shards.problems import NO_IMAGE, ShardError
from tokenmill.pipeline.shards.wds_io import Sample, TarDamage, iter_samples

# (key, image member extension, image bytes) -> uint8 pixels; raises DecodeError.
Decoder = Callable[[str, str, bytes], np.ndarray]


@dataclass(slots=True)
class ShardSample:
    key: str
    label: int  # the `cls` member, -1 when absent or not an integer
    pixels: np.ndarray | None  # what the decoder returned; None when read without one
    members: dict[str, bytes]  # every member by extension (metadata checks)


def read_samples(fileobj: BinaryIO, shard: str, decode: Decoder | None) -> Iterator[ShardSample | ShardError]:
    """Samples of the tar stream `fileobj` (shard URL `shard`, for the reports) in archive order.
    Without `decode`, image members are not decoded (pixels None) and never fail."""
    for item in iter_samples(fileobj):
        if isinstance(item, TarDamage):
            yield ShardError(shard, item.key, item.reason)
            continue
        found = item.image_member()
        if found is None:
            yield ShardError(shard, item.key, NO_IMAGE)
            continue
        try:
            pixels = decode(item.key, *found) if decode is not None else None
        except DecodeError as err:
            yield ShardError(shard, item.key, str(err))
            continue
        yield ShardSample(item.key, item.label(), pixels, item.members)


def read_shard(url: str, decode: Decoder | None, storage_options: dict | None = None) -> Iterator[ShardSample | ShardError]:
    """`read_samples` of the shard at fsspec `url`."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        yield from read_samples(f, url, decode)


def read_shard_threaded(url: str, decode: Decoder, threads: int, storage_options: dict | None = None,
                        window: int = 256) -> Iterator[ShardSample | ShardError]:
    """`read_shard`, with images decoded by `threads` threads: the same items in the same order
    (`read_shards_threaded` of one shard)."""
    for _, item in read_shards_threaded([url], decode, threads, storage_options, ahead=window):
        yield item


def read_shards_threaded(urls: list[str], decode: Decoder, threads: int, storage_options: dict | None = None,
                         ahead: int = 256) -> Iterator[tuple[int, ShardSample | ShardError]]:
    """(position in `urls`, item) of every shard in turn, as `read_shard` gives them, with images
    decoded by `threads` threads (PIL, libspng and libjpeg-turbo release the GIL). The caller's
    thread reads the tars and keeps up to `ahead` samples submitted to the decoders, continuously
    and across shard boundaries (no per-window or per-shard stall); memory stays at `ahead`
    samples of compressed bytes and pixels."""
    if threads <= 1:
        for position, url in enumerate(urls):
            for item in read_shard(url, decode, storage_options):
                yield position, item
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    def finish(url: str, item: ShardSample) -> ShardSample | ShardError:
        found = Sample(item.key, item.members).image_member()  # read_shard without a decoder checked it exists
        try:
            item.pixels = decode(item.key, *found)
        except DecodeError as err:
            return ShardError(url, item.key, str(err))
        return item

    queued: deque[tuple[int, Future | ShardError]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        try:
            for position, url in enumerate(urls):
                for item in read_shard(url, None, storage_options):
                    queued.append((position, item if isinstance(item, ShardError) else pool.submit(finish, url, item)))
                    while len(queued) > ahead:
                        yield _resolved(queued.popleft())
            while queued:
                yield _resolved(queued.popleft())
        finally:  # closed early: queued decodes are dropped, not waited for
            for _, pending in queued:
                if isinstance(pending, Future):
                    pending.cancel()


def _resolved(entry: tuple[int, Any]) -> tuple[int, ShardSample | ShardError]:
    position, pending = entry
    return position, pending if isinstance(pending, ShardError) else pending.result()


def pixels_decoder(transform: TransformConfig, seed: int = 0, epoch: int = 0) -> Decoder:
    """The decoder of the stream and of tokenization: (size, size, channels) uint8 arrays; random
    crops and flips (when `transform` has them) drawn from (seed, epoch, key)."""
    if transform.hflip or transform.resize.startswith("random"):
        return lambda key, ext, data: decode_image(data, transform, Draw(seed, epoch, key))
    return lambda key, ext, data: decode_image(data, transform)


def good_samples(items: Iterable[ShardSample | ShardError], errors: list[dict[str, str]]) -> Iterator[ShardSample]:
    """The samples of `items`; every ShardError is appended to `errors` (as a dict) before the
    sample after it is yielded."""
    for item in items:
        if isinstance(item, ShardError):
            errors.append(item.as_dict())
        else:
            yield item


def sample_batches(samples: Iterable[ShardSample], size: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(images (n, H, W, C) uint8, labels (n,) int64, keys) of up to `size` decoded samples."""
    chunk: list[ShardSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield _stack(chunk)
            chunk = []
    if chunk:
        yield _stack(chunk)


def _stack(chunk: list[ShardSample]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return (np.stack([s.pixels for s in chunk]), np.array([s.label for s in chunk], dtype=np.int64),
            [s.key for s in chunk])
