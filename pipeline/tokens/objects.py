"""Whole-object writes that concurrent drivers and writers can share safely.

A reader never sees half an object: a local file is written to a temporary name beside it and
renamed (object stores replace an object atomically on PUT). `exclusive=True` is
create-if-absent, the lock that object storage honours: `os.link` locally (fails if the name
exists), a conditional PUT (`If-None-Match: *`, fsspec's `mode="create"`) on S3 and GCS. Other
fsspec filesystems fall back to check-then-write, which is not atomic.
"""

from __future__ import annotations

import os
import uuid

import fsspec


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def put_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` whole; with `exclusive`, only if nothing is there. Returns False
    when `exclusive` found the object already present, else True."""
    if is_local(fs):
        return _put_local(path, data, exclusive)
    try:
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")
    except FileExistsError:
        return False
    return True


def put_objects(fs: fsspec.AbstractFileSystem, objects: dict[str, bytes]) -> None:
    """`put_object` for many paths; on object stores the PUTs run concurrently."""
    if is_local(fs):
        for path, data in objects.items():
            _put_local(path, data, exclusive=False)
    elif objects:
        fs.pipe(objects)


def _put_local(path: str, data: bytes, exclusive: bool) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # zarr's own temporary suffix: the store removes stale `*.partial` files of killed writers.
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as file:
        file.write(data)
    try:
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic, and fails when `path` exists
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
