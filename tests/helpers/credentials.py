"""Fake storage credentials and the check that a record leaks none of them (tests of redaction)."""

from __future__ import annotations

KEY, SECRET = "KEY-FAKE-4242", "SECRET-FAKE-4242"
ENV_KEY, ENV_SECRET = "ENVKEY-FAKE-4242", "ENVSECRET-FAKE-4242"
FAKES = (KEY, SECRET, ENV_KEY, ENV_SECRET)


def leaks(text: str | bytes) -> bool:
    """Whether `text` holds any of the fake credentials."""
    data = text.encode() if isinstance(text, str) else text
    return any(fake.encode() in data for fake in FAKES)
