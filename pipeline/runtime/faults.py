"""Fault injection for tests: named points in product code that fail when a test asks them to.

Off unless `TOKENMILL_FAULTS` is set (then `hit` costs one environment lookup). Its value is
one or more faults separated by ";", each `POINT[,NAME=VALUE...]`: the point, conditions on
the values the point passes, and two options:
    action=raise   (default) raise InjectedFault;  action=exit: the process dies (exit code 1)
    action=wait    with until=FILE: create FILE.waiting-<pid> (this process), then wait until FILE
                   exists (at most 10 minutes), e.g. while a test removes this worker's node
    once=FILE      fire only while FILE does not exist, creating it: a retried attempt succeeds

    TOKENMILL_FAULTS="train.step,step=7,rank=1,once=/tmp/failed"    # the rank-1 worker, once
    TOKENMILL_FAULTS="tokenize.before_marker,unit=2,action=exit,once=/tmp/died"

Ray workers do not inherit the driver's environment: drivers forward `env_vars()` to them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "TOKENMILL_FAULTS"
STORAGE_ENV = "TOKENMILL_STORAGE_FAULTS"  # object-storage write faults (pipeline.storage_faults)
# point -> the values it passes to `hit`
POINTS = {
    "train.step": ("step", "rank"),  # after a training step (the step just done), on every rank
    "tokenize.before_marker": ("unit",),  # a work unit's rows are written, its marker is not
    "store.create": (),  # a new store's nodes are written, its root zarr.json (the commit) is not
}
ACTIONS = ("raise", "exit", "wait")
WAIT_LIMIT_S = 600


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
