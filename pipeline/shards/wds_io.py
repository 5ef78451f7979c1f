"""Reading WebDataset tars sample by sample through fsspec, with damage reported, not raised.

webdataset has no `s3://` handler and its error handlers sleep per error, so the shard reader
(`pipeline.shards.reader`) reads tars here: `iter_samples(fileobj)` groups consecutive members
by key exactly like webdataset (`base_plus_ext`: the key is the member name up to the first
dot of its base name) and ends with a `TarDamage` item when the archive is empty or cut short,
keeping every sample read before the damage.
"""

from __future__ import annotations

import hashlib
import lzma
import posixpath
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from webdataset.tariterators import base_plus_ext

from tokenmill.pipeline.runtime.storage_retry import is_transient
from tokenmill.pipeline.shards.images import IMAGE_EXTENSIONS
from tokenmill.pipeline.shards.problems import EMPTY_TAR, NOT_A_TAR, TRUNCATED_TAR, reason
from tokenmill.pipeline.shards.tar_reader import TarFormatError, iter_files


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension (lower case) -> bytes

    def image_member(self) -> tuple[str, bytes] | None:
        """(extension, bytes) of the image member, preferring IMAGE_EXTENSIONS order."""
        for ext in IMAGE_EXTENSIONS:
            if ext in self.members:
                return ext, self.members[ext]
        return None

    def label(self) -> int:
        """The `cls` member as an int, -1 when absent or not an integer."""
        try:
            return int(self.members["cls"].decode().strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            return -1


@dataclass
class TarDamage:
    reason: str  # EMPTY_TAR, NOT_A_TAR: ..., TRUNCATED_TAR: ... (pipeline.shards.problems)
    key: str = ""  # the sample being read when the damage was hit (dropped), if any


def iter_samples(fileobj) -> Iterator[Sample | TarDamage]:
    """Samples of one tar stream in archive order; a final TarDamage if the tar is empty or
    damaged. Members whose names have no extension and `__meta__` members are skipped."""
    current: Sample | None = None
    members = 0
    try:
        for name, data in iter_files(fileobj):
            members += 1
            key, ext = base_plus_ext(name)
            if key is None or posixpath.basename(key).startswith("__"):
                continue
            if current is not None and current.key != key:
                yield current
                current = None
            current = current or Sample(key)
            current.members[ext.lower()] = data
    except (TarFormatError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        if is_transient(err) or isinstance(err, (PermissionError, FileNotFoundError)):
            raise  # the storage failed, not the tar: never count its samples as lost (storage_retry retries)
        if str(err) == EMPTY_TAR:
            why = EMPTY_TAR
        elif members == 0:
            why = reason(NOT_A_TAR, err)
        else:
            why = reason(TRUNCATED_TAR, err)
        yield TarDamage(why, current.key if current else "")
        return
    if current is not None:
        yield current


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes their sha256 on the way."""

    def __init__(self, fileobj):
        self.fileobj, self.sha256, self.bytes = fileobj, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.fileobj.write(data)

    def flush(self) -> None:
        self.fileobj.flush()


class HashingReader:
    """A read-only file wrapper that counts bytes and computes their sha256; `drain()` reads
    the rest (tar readers stop at the end-of-archive marker, before the padding)."""

    def __init__(self, fileobj):
        self.fileobj, self.sha256, self.bytes = fileobj, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
