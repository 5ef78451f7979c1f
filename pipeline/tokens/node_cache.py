"""`NodeChunkCache`: store chunks shared by the processes (ranks) of one node through a local folder.

The 8 ranks of a node read the same chunks of a remote store (an epoch's chunk order is the same
on every rank). The first rank to need a chunk fetches it and writes `<folder>/<key>.npy` whole
(a temporary name, then a rename: a reader never sees half a file); the others read that file.
A striped `flock` per key makes the others wait for the fetch in flight instead of repeating it,
and the OS drops it when its holder dies. Keys hash the store URL, the arrays, the store's identity
(its attributes: a rewritten store never serves another store's chunks) and the chunk id.

The folder is bounded: a process that has written `budget / 8` bytes since its last look lists
the folder and deletes the least recently used files (a hit refreshes the mtime) down to 3/4 of
the budget, so the folder exceeds the budget by at most `processes * budget / 8`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

LOCK_STRIPES = 256  # fetches of different chunks rarely wait on each other, and the lock files stay few


def default_folder() -> str:
    """Node-local memory (`/dev/shm`, sized on the cluster's pods) where present, else the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, "tokenmill-chunks")


def store_namespace(url: str, arrays: list[str], attrs: dict[str, Any]) -> str:
    """The key prefix of one store's chunks: URL, arrays and the store's attributes (lineage,
    layout, summary: what a rewrite changes)."""
    identity = json.dumps([url, arrays, attrs], sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class NodeChunkCache:
    def __init__(self, folder: str, budget_bytes: int):
        self.folder, self.budget = Path(folder), int(budget_bytes)
        (self.folder / "locks").mkdir(parents=True, exist_ok=True)
        self._written_since_scan = self.budget  # look at the folder on the first write

    def get(self, key: str, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk `key`: from the folder, else `load()` (once per node) and kept there."""
        path = self.folder / f"{key}.npy"
        block = self._read(path)
        if block is not None:
            return block
        with self._lock(key):
            block = self._read(path)  # another rank may have fetched it while this one waited
            if block is not None:
                return block
            block = load()
            if block.nbytes <= self.budget:
                self._write(path, block)
        self._written_since_scan += block.nbytes
        if self._written_since_scan >= self.budget / 8:
            self._evict()
        return block

    @staticmethod
    def _read(path: Path) -> np.ndarray | None:
        try:
            block = np.load(path, allow_pickle=False)
            os.utime(path)  # recently used: evicted last
            return block
        except (FileNotFoundError, ValueError, EOFError):  # absent, evicted meanwhile, or unreadable
            return None

    def _write(self, path: Path, block: np.ndarray) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as file:
                np.save(file, block, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:  # a full disk only costs the sharing, never the read
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _lock(self, key: str, name: str | None = None, blocking: bool = True) -> Iterator[bool]:
        stripe = name or f"{int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % LOCK_STRIPES}"
        with open(self.folder / "locks" / f"{stripe}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _evict(self) -> None:
        """Delete the least recently used chunks down to 3/4 of the budget (one process at a time)."""
        self._written_since_scan = 0
        with self._lock("", name="evict", blocking=False) as mine:
            if not mine:
                return  # another rank is evicting now
            files = []
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".npy"):
                    with contextlib.suppress(FileNotFoundError):
                        stat = entry.stat()
                        files.append((stat.st_mtime, stat.st_size, entry.path))
            total = sum(size for _, size, _ in files)
            if total <= self.budget:
                return
            for _, size, path in sorted(files):
                if total <= self.budget * 3 // 4:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= size
