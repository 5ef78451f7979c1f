"""Is an output path writable, and ours? Checked once, before any work starts.

Every command that writes calls `check_output` on each place it writes (a folder, or a file)
before it reads, trains or encodes anything: a parent that is a file, a folder the user cannot
write, or an existing non-empty folder that holds none of the command's own marks (a shard
manifest, a store's zarr.json, a run folder's mlflow.db …) would otherwise fail half way, or
mix our files into someone else's folder. The answer is `OutputError` (a `ValueError`): one line
naming the path, the cause and the fix; callers turn it into a `UserError` or argparse's error.

Remote URLs (s3://, memory://) have no parents or permissions to check here: only "a file where a
folder goes" and the marks apply, through fsspec.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Iterable

from tokenmill.models.errors import UserError
from tokenmill.pipeline.runtime.storage import filesystem

# What a training run's folder (`run.root/run.name`) holds: the exported model and the default
# tracking store with its artifacts (pipeline.training.driver, pipeline.registry.tracking).
RUN_DIR_MARKS = ("model", "mlflow.db", "mlartifacts")


class OutputError(ValueError):
    """An output that cannot be written, or a folder that is not ours; the message is one line."""


def check_output(url: str | os.PathLike, *, folder: bool = True, marks: Iterable[str] | None = (),
                 storage_options: dict | None = None) -> None:
    """Refuse `url` as an output (OutputError) before any work:
    - it exists as a file where a folder goes (`folder=True`), or as a folder where a file goes;
    - a parent of it is a file, or the nearest existing folder is not writable (local paths);
    - `folder=True`, it is a non-empty folder, and no entry matches one of `marks` (glob patterns
      relative to it, e.g. "manifest.json", "grid-*.png", "*/model"): not ours. `marks=None`
      accepts any content (a scratch folder the command owns wholly)."""
    text = os.fspath(url)
    if "://" in text and not text.startswith("file://"):
        return _check_remote(text, folder, marks, storage_options)
    try:
        _check_local(text, Path(text.removeprefix("file://")).expanduser(), folder, marks)
    except PermissionError:  # a parent the user may not even look into
        raise OutputError(f"{text}: no permission to reach it; pass a path you can write") from None


def _check_local(text: str, path: Path, folder: bool, marks: Iterable[str] | None) -> None:
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise OutputError(f"{text} is a file; pass a folder (it is created if missing)")
        if not folder and path.is_dir():
            raise OutputError(f"{text} is a folder; pass a file path")
        if not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise OutputError(f"{text}: no permission to write there; pass a path you can write")
        if folder and marks is not None:
            _check_ours(text, sorted(p.name for p in path.iterdir()), _local_matches(path), marks)
        return
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputError(f"{text}: its parent {ancestor} is a file, not a folder; pass a path under a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{text}: no permission to create it in {ancestor}; pass a path you can write")


@contextlib.contextmanager
def removed_if_refused(path: Path):
    """Creates the local folder `path` (with its parents), which the driver's own checks need (a
    run's SQLite tracking store); a UserError inside the block removes the folders it created
    while they hold no file, so a refused command leaves nothing behind."""
    top = None if path.exists() else _highest_missing(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except UserError:
        if top is not None and all(p.is_dir() for p in top.rglob("*")):
            shutil.rmtree(top, ignore_errors=True)
        raise


def _highest_missing(path: Path) -> Path:
    while not path.parent.exists() and path.parent != path.parent.parent:
        path = path.parent
    return path


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (a file among the parents ends the walk)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def _local_matches(folder: Path):
    return lambda pattern: any(True for _ in folder.glob(pattern))


def _check_ours(text: str, entries: list[str], matches, marks: Iterable[str]) -> None:
    marks = list(marks)
    if not entries or any(matches(mark) for mark in marks):
        return
    shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
    raise OutputError(f"{text} is a non-empty folder ({shown}) that a previous run of this command did not write "
                      f"(none of {', '.join(marks)}); pass an empty or new folder")


def _check_remote(url: str, folder: bool, marks: Iterable[str] | None, storage_options: dict | None) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        _check_remote_in(fs, path, url, folder, marks)
    finally:  # the filesystem instance is shared: later reads must not see these listings (other writers)
        fs.invalidate_cache()


def _check_remote_in(fs, path: str, url: str, folder: bool, marks: Iterable[str] | None) -> None:
    if folder and fs.isfile(path):
        raise OutputError(f"{url} is a file; pass a folder URL")
    if not folder and fs.isdir(path) and fs.ls(path, detail=False):
        raise OutputError(f"{url} is a folder; pass a file URL")
    if folder and marks is not None and fs.isdir(path):
        entries = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        _check_ours(url, entries, lambda mark: any(fnmatch.fnmatch(e, mark) for e in entries)
                    or bool(fs.glob(f"{path.rstrip('/')}/{mark}")), marks)
