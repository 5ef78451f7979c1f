"""fsspec helpers every subsystem uses: a URL's filesystem, and joining URLs and paths."""

from __future__ import annotations

import posixpath

import fsspec


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of an fsspec URL; `storage_options` go to the filesystem."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(base: str, name: str) -> str:
    """`base/name` for URLs and local paths alike (a URL already absolute is returned as is)."""
    if "://" in name or name.startswith("/"):
        return name
    return posixpath.join(base.rstrip("/"), name)
