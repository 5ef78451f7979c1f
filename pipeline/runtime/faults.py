"""Fault injection for tests: named points in product code that fail, and object-storage writes
that fail, when a test asks for them through the environment.

Fault points (`TOKENMILL_FAULTS`): off unless the variable is set (then `hit` costs one
environment lookup). Its value is one or more faults separated by ";", each
`POINT[,NAME=VALUE...]`: the point, conditions on the values the point passes, and two options:
    action=raise   (default) raise InjectedFault;  action=exit: the process dies (exit code 1)
    action=wait    with until=FILE: create FILE.waiting-<pid> (this process), then wait until FILE
                   exists (at most 10 minutes), e.g. while a test removes this worker's node
    once=FILE      fire only while FILE does not exist, creating it: a retried attempt succeeds

    TOKENMILL_FAULTS="train.step,step=7,rank=1,once=/tmp/failed"    # the rank-1 worker, once
    TOKENMILL_FAULTS="tokenize.before_marker,unit=2,action=exit,once=/tmp/died"

Storage faults (`TOKENMILL_STORAGE_FAULTS`): `install_from_env()` makes `s3://` URLs open
`FaultyS3FileSystem` in this process: the real s3fs client, whose write calls (put_object,
upload_part, copy_object, ...) first pass through `inject`. Nothing installs it on import: every
process entry point that writes to object storage calls `install_from_env()` (a no-op unless the
variable is set): the CLI's `main`, the tokenize actors, the parallel shard writers and the
training loops. The value is comma-separated NAME=VALUE pairs:

    rate=0.02          a write to ~2% of object paths (by hash of the path) fails once, transiently
    transient=TEXT     writes to paths containing TEXT fail once, transiently (a fault that surely fires)
    permanent=TEXT     writes to paths containing TEXT always fail: PermissionError (access denied)
    dir=FOLDER         required: once-flags (shared by all processes) and `injected.log`, one line per fault

Transient faults rotate through a connection reset, a read timeout and S3 throttling (SlowDown),
raised outside s3fs's own retry loop, so what handles them is `pipeline.runtime.storage_retry`.

Ray workers do not inherit the driver's environment: drivers forward `env_vars()` to them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass

ENV = "TOKENMILL_FAULTS"
STORAGE_ENV = "TOKENMILL_STORAGE_FAULTS"  # object-storage write faults (`install_from_env`)
# point -> the values it passes to `hit`
POINTS = {
    "train.step": ("step", "rank"),  # after a training step (the step just done), on every rank
    "tokenize.before_marker": ("unit",),  # a work unit's rows are written, its marker is not
    "store.create": (),  # a new store's nodes are written, its root zarr.json (the commit) is not
}
ACTIONS = ("raise", "exit", "wait")
WAIT_LIMIT_S = 600
WRITE_CALLS = {"put_object", "upload_part", "create_multipart_upload", "complete_multipart_upload", "copy_object",
               "upload_part_copy"}  # the s3 calls a storage fault may fail
S3_PROTOCOLS = ("s3", "s3a")


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


@dataclass(frozen=True)
class Fault:
    point: str
    when: dict[str, str]
    action: str = "raise"
    once: str | None = None
    until: str | None = None


def parse(spec: str) -> list[Fault]:
    """The faults of a TOKENMILL_FAULTS value; ValueError naming the mistake."""
    faults = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        point, *pairs = (p.strip() for p in text.split(","))
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {point!r}; known: {', '.join(POINTS)}")
        fields = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        action, once, until = fields.pop("action", "raise"), fields.pop("once", None), fields.pop("until", None)
        if (any("=" not in pair for pair in pairs) or action not in ACTIONS or not set(fields) <= set(POINTS[point])
                or (action == "wait") != (until is not None)):
            raise ValueError(f"{ENV}: bad fault {text!r}; {point} takes {', '.join(POINTS[point])}, "
                             f"action={'|'.join(ACTIONS)}, once=FILE, until=FILE (with action=wait only)")
        faults.append(Fault(point, fields, action, once, until))
    return faults


def hit(point: str, **values: object) -> None:
    """A fault point: fails as a matching fault in TOKENMILL_FAULTS says; nothing when it is unset."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for fault in parse(spec):
        if fault.point != point or any(str(values[k]) != v for k, v in fault.when.items()):
            continue
        if fault.once is not None and not _first_time(fault.once):
            continue
        if fault.action == "exit":
            os._exit(1)
        if fault.action == "wait":
            _wait_for(fault.until)
            continue
        raise InjectedFault(f"injected failure at {point} {values} ({ENV})")


def env_vars() -> dict[str, str]:
    """TOKENMILL_FAULTS and TOKENMILL_STORAGE_FAULTS where set: the environment to forward to Ray workers."""
    return {name: os.environ[name] for name in (ENV, STORAGE_ENV) if os.environ.get(name)}


def _wait_for(flag: str) -> None:
    open(f"{flag}.waiting-{os.getpid()}", "w").close()
    deadline = time.time() + WAIT_LIMIT_S
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.2)


def _first_time(flag: str) -> bool:
    """Create `flag`; False when it already existed (atomic across processes)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Storage faults: s3fs writes that fail (TOKENMILL_STORAGE_FAULTS)


def storage_settings() -> dict[str, str]:
    """The NAME=VALUE pairs of TOKENMILL_STORAGE_FAULTS ({} when unset); ValueError without dir=."""
    spec = os.environ.get(STORAGE_ENV, "")
    values = dict(pair.split("=", 1) for pair in spec.split(",") if "=" in pair)
    if spec and "dir" not in values:
        raise ValueError(f"{STORAGE_ENV}={spec!r}: needs dir=FOLDER")
    return values


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
    """Raise the fault the storage settings give for a write `method` on `path`, if any; log it."""
    config = storage_settings()
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


def _faulty_s3_class() -> type:
    """`FaultyS3FileSystem`, built on first use: importing this module must not import s3fs (the
    token store's readers import it for `hit`). Kept as a module attribute, so it pickles by name."""
    cls = globals().get("FaultyS3FileSystem")
    if cls is not None:
        return cls
    import s3fs

    class FaultyS3FileSystem(s3fs.S3FileSystem):
        """s3fs with `inject` in front of every S3 write call."""

        async def _call_s3(self, method, *args, **kwargs):
            name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
            inject(name, f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}")
            return await super()._call_s3(method, *args, **kwargs)

    FaultyS3FileSystem.__qualname__ = "FaultyS3FileSystem"
    globals()["FaultyS3FileSystem"] = FaultyS3FileSystem
    return FaultyS3FileSystem


def __getattr__(name: str):  # `faults.FaultyS3FileSystem` (and unpickling it) builds the class
    if name == "FaultyS3FileSystem":
        return _faulty_s3_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_from_env() -> None:
    """`s3://` opens FaultyS3FileSystem in this process when TOKENMILL_STORAGE_FAULTS is set (else
    nothing). Called at every entry point of a process that writes to object storage."""
    if storage_settings():
        import fsspec

        for protocol in S3_PROTOCOLS:
            fsspec.register_implementation(protocol, _faulty_s3_class(), clobber=True)


def uninstall() -> None:
    """`s3://` opens the plain s3fs filesystem again (tests, after `install_from_env`)."""
    import fsspec
    import s3fs

    for protocol in S3_PROTOCOLS:
        fsspec.register_implementation(protocol, s3fs.S3FileSystem, clobber=True)
