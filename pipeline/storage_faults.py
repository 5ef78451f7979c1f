"""Fault injection for tests: object-storage writes that fail, in every process of a job.

Off unless `TOKENMILL_STORAGE_FAULTS` is set. Then `install()` (run by `import pipeline`, so in
the driver and in every Ray worker that gets the variable, see `faults.env_vars`) makes `s3://`
URLs open `FaultyS3FileSystem`: the real s3fs client, whose write calls (put_object, upload_part,
copy_object, ...) first pass through `inject`. The value is comma-separated NAME=VALUE pairs:

    rate=0.02          a write to ~2% of object paths (by hash of the path) fails once, transiently
    transient=TEXT     writes to paths containing TEXT fail once, transiently (a fault that surely fires)
    permanent=TEXT     writes to paths containing TEXT always fail: PermissionError (access denied)
    dir=FOLDER         required: once-flags (shared by all processes) and `injected.log`, one line per fault

Transient faults rotate through a connection reset, a read timeout and S3 throttling (SlowDown),
raised outside s3fs's own retry loop, so what handles them is `pipeline.runtime.storage_retry`.
"""

from __future__ import annotations

import errno
import hashlib
import os

import fsspec
import s3fs

from pipeline.runtime.faults import STORAGE_ENV as ENV

WRITE_CALLS = {"put_object", "upload_part", "create_multipart_upload", "complete_multipart_upload", "copy_object",
               "upload_part_copy"}


def settings() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    values = dict(pair.split("=", 1) for pair in spec.split(",") if "=" in pair)
    if spec and "dir" not in values:
        raise ValueError(f"{ENV}={spec!r}: needs dir=FOLDER")
    return values


def _first_time(flag: str) -> bool:
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _transient_error(path: str, digest: int) -> Exception:
    from botocore.exceptions import ClientError

    kind = digest % 3
    if kind == 0:
        return ConnectionResetError(errno.ECONNRESET, f"injected: connection reset by peer writing {path}")
    if kind == 1:
        return TimeoutError(f"injected: read timeout writing {path}")
    return ClientError({"Error": {"Code": "SlowDown", "Message": f"injected: reduce your request rate ({path})"},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")


def inject(method: str, path: str) -> None:
    """Raise the fault the settings give for a write `method` on `path`, if any; log it."""
    config = settings()
    if method not in WRITE_CALLS or not config:
        return
    digest = int(hashlib.sha1(path.encode()).hexdigest()[:8], 16)
    error: Exception | None = None
    if config.get("permanent") and config["permanent"] in path:
        error = PermissionError(errno.EACCES, "Access Denied (injected)", path)
    elif (config.get("transient") and config["transient"] in path) or digest % 10_000 < float(config.get("rate", 0)) * 10_000:
        flag = os.path.join(config["dir"], f"once-{hashlib.sha1(f'{method}:{path}'.encode()).hexdigest()}")
        if _first_time(flag):
            error = _transient_error(path, digest)
    if error is not None:
        with open(os.path.join(config["dir"], "injected.log"), "a") as log:
            log.write(f"{'permanent' if isinstance(error, PermissionError) else 'transient'} {method} {path}\n")
        raise error


class FaultyS3FileSystem(s3fs.S3FileSystem):
    """s3fs with `inject` in front of every S3 write call."""

    async def _call_s3(self, method, *args, **kwargs):
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        inject(name, f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}")
        return await super()._call_s3(method, *args, **kwargs)


def install() -> None:
    """`s3://` opens FaultyS3FileSystem in this process (no-op unless TOKENMILL_STORAGE_FAULTS is set)."""
    if settings():
        for protocol in ("s3", "s3a"):
            fsspec.register_implementation(protocol, FaultyS3FileSystem, clobber=True)


def uninstall() -> None:
    for protocol in ("s3", "s3a"):
        fsspec.register_implementation(protocol, s3fs.S3FileSystem, clobber=True)
