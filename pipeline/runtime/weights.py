"""Pretrained weight files from any fsspec URL (s3://, https://, gs://, a local path), checked
against the sha256 configured next to the URL and cached on this node.

A local file is used in place. A remote one is copied once into `<cache>/<sha256>/<name>`
(TOKENMILL_WEIGHTS_CACHE, default ~/.cache/tokenmill/weights) under a file lock (the ranks of one
node download it once) through a temporary file renamed only when its hash is right; a cached
copy is hashed again before use. A missing file or a hash mismatch is one UserError (exit 2) naming the setting.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import sys
import tempfile
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from tokenmill.models.errors import UserError
from tokenmill.models.lpips import LIN_SHA256, VGG_SHA256, LPIPSWeights
from tokenmill.models.serialization import file_sha256
from tokenmill.pipeline.runtime.storage import filesystem
from tokenmill.pipeline.runtime.storage_retry import retry_storage

CACHE_ENV = "TOKENMILL_WEIGHTS_CACHE"
PERCEPTUAL_SETTINGS = ("loss.perceptual.vgg_path", "loss.perceptual.lin_path")  # a VQGAN train config's
SHA256 = re.compile(r"[0-9a-f]{8,64}")  # a full digest, or a published prefix (torchvision's 8 characters)


def weights_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tokenmill" / "weights")


def fetch_weights(url: str, sha256: str, setting: str, cache: Path | None = None) -> Path:
    """A local file with `url`'s bytes, whose sha256 starts with `sha256`. `setting` names the
    config key or flag in messages."""
    expected = sha256.lower()
    if not SHA256.fullmatch(expected):
        raise UserError(f"{setting}: expected sha256 {sha256!r} is not 8 to 64 hex digits")
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        local = Path(path)
        if not local.is_file():
            raise UserError(f"{setting}: {url} does not exist")
        _check(file_sha256(local), expected, url, setting)
        return local
    cached = (cache or weights_cache()) / expected / posixpath.basename(path.rstrip("/"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.parent / f".{cached.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of one node: one downloads, the others wait and reuse
        if cached.is_file() and file_sha256(cached).startswith(expected):
            return cached
        if not retry_storage(lambda: fs.isfile(path), what=f"{setting}: looking up", url=url):
            raise UserError(f"{setting}: {url} does not exist")
        _download(fs, path, url, expected, cached, setting)
    return cached


def _download(fs, path: str, url: str, expected: str, cached: Path, setting: str) -> None:
    """`path` to `cached` through a temporary file, renamed only once its hash is checked."""
    handle, partial = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.")
    os.close(handle)
    try:
        digest = retry_storage(lambda: _copy(fs, path, Path(partial)), what=f"{setting}: downloading", url=url)
        _check(digest, expected, url, setting)
        os.replace(partial, cached)
    finally:
        Path(partial).unlink(missing_ok=True)


def _copy(fs, path: str, dest: Path) -> str:
    """Stream `path` into `dest` (from the start on every retry); its sha256."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as source, open(dest, "wb") as out:
        for block in iter(lambda: source.read(1 << 22), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _check(found: str, expected: str, url: str, setting: str) -> None:
    if not found.startswith(expected):
        raise UserError(f"{setting}: {url} has sha256 {found[:16]}…, expected {expected[:16]}…; "
                        "replace the file, or set the expected sha256 next to the URL")


def local_lpips_weights(config: LPIPSWeights, settings: tuple[str, str] = PERCEPTUAL_SETTINGS) -> LPIPSWeights:
    """`config` with each URL replaced by a local file (a remote one fetched, checked and cached);
    `models.lpips.resolve_lpips_weights` then loads it like any local path. A remote file is
    always checked: against `*_sha256` when set, else the published weights' hash. A local one
    is checked there (unless verify_sha256 is off and no hash is set: tests' random weights).
    `settings` name the two paths in messages (config keys, or a job's flags)."""
    changes = {}
    for (name, published), setting in zip((("vgg", VGG_SHA256), ("lin", LIN_SHA256)), settings):
        url, expected = getattr(config, f"{name}_path"), getattr(config, f"{name}_sha256")
        if not url:
            continue
        fs, path = filesystem(url)
        if isinstance(fs, LocalFileSystem) and not expected:
            changes[f"{name}_path"] = path  # file:// stripped; existence and hash checked on resolve
        else:
            changes[f"{name}_path"] = str(fetch_weights(url, expected or published, setting))
    return dataclasses.replace(config, **changes)


def install_weights(url: str, sha256: str, dest: Path) -> Path:
    """`url`'s checked bytes at `dest`: how infra/Dockerfile bakes weights into the image."""
    with tempfile.TemporaryDirectory() as cache:
        found = fetch_weights(url, sha256, dest.name, cache=Path(cache))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, dest)
    return dest


if __name__ == "__main__":  # python -m tokenmill.pipeline.runtime.weights URL SHA256 DEST (infra/Dockerfile)
    url, sha256, dest = sys.argv[1:]
    print(f"{url} -> {install_weights(url, sha256, Path(dest))}")
