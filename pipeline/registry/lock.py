"""A lock held through the MLflow model registry, so retrain runs on any machine exclude each other.

MLflow has no compare-and-set, but creating a registered model is create-if-absent: the
backend's unique key on the name lets exactly one of any number of concurrent
`create_registered_model(name)` calls succeed (the others get RESOURCE_ALREADY_EXISTS). The lock
is such a model, created together with its tags `owner` (unique per acquisition) and
`expires_at` (unix seconds), and deleted on release.

Expiry: a lock past `expires_at` belongs to a crashed run and may be broken. Breaking is a race
of its own (two runs see it expired; one deletes it and takes a fresh lock, the other deletes
that), so a breaker first creates `<lock>.break-<stale owner>`, again create-if-absent, so one
run wins per stale lock, and only the winner deletes the lock, after re-reading that it still
belongs to the stale owner.

What this guarantees: one holder at a time, provided every holder finishes within
`expiry_s` of acquiring (and machine clocks agree to well within it). A holder that overruns may
be broken while still running; `check()` before each irreversible write narrows what it can
then do to one request's time.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

OWNER, HOLDER, EXPIRES_AT = "tokenmill.lock.owner", "tokenmill.lock.holder", "tokenmill.lock.expires_at"


class LockBusy(RuntimeError):
    """Another run held the lock for longer than we were willing to wait."""


class LockLost(RuntimeError):
    """Our lock expired and was taken over: stop before writing anything else."""


@dataclass
class RegistryLock:
    client: "mlflow.MlflowClient"  # noqa: F821 - imported lazily by callers
    name: str
    owner: str

    def check(self) -> None:
        """Raise LockLost unless the lock is still ours."""
        tags = _read(self.client, self.name)
        if tags is None or tags.get(OWNER) != self.owner:
            raise LockLost(f"the lock {self.name} expired and was taken over; nothing was promoted")

    def release(self) -> None:
        tags = _read(self.client, self.name)
        if tags is not None and tags.get(OWNER) == self.owner:  # never delete a lock taken over from us
            _delete(self.client, self.name)

    def __enter__(self) -> "RegistryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(client, name: str, expiry_s: float, wait_s: float, poll_s: float = 1.0) -> RegistryLock:
    """Take the lock `name`, waiting up to `wait_s` for a live holder; LockBusy after that."""
    owner = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        tags = {OWNER: owner, HOLDER: f"{socket.gethostname()} pid {os.getpid()}",
                EXPIRES_AT: f"{time.time() + expiry_s:.3f}"}
        if _create(client, name, tags):
            return RegistryLock(client, name, owner)
        held = _read(client, name)
        if held is None:
            continue  # released between our create and read: try again at once
        expires_at = float(held.get(EXPIRES_AT, "inf"))  # our locks are created with their tags, atomically
        if expires_at < time.time() and _break(client, name, held.get(OWNER, "")):
            continue
        if time.monotonic() >= deadline:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_at)) if expires_at < float("inf") else "?"
            raise LockBusy(f"the lock {name} is held by {held.get(HOLDER, 'an unknown run')} until {until} "
                           f"(waited {wait_s:.0f} s)")
        time.sleep(poll_s)


def _break(client, name: str, stale_owner: str) -> bool:
    """Delete the expired lock of `stale_owner` if this run wins the right to; True if we did."""
    token = f"{name}.break-{stale_owner}"
    if not _create(client, token, {}):
        return False
    try:
        tags = _read(client, name)
        if tags is None or tags.get(OWNER) != stale_owner:
            return False  # already replaced: someone else's fresh lock, leave it
        _delete(client, name)
        return True
    finally:
        _delete(client, token)


def _create(client, name: str, tags: dict[str, str]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags=tags, description="tokenmill retrain promotion lock")
        return True
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _read(client, name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).tags)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _delete(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
