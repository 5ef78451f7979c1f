"""Secrets stay out of records: `redact` is applied to every config or summary we RECORD (MLflow
params and tags, token-store lineage, `--json` summaries); the job itself keeps the real values.

A key is secret when its name (case-insensitive, `_`/`-`/`.` ignored) is exactly `key`/`secret`/
`token`/`password`, contains `secret`/`password`/`passwd`/`credential`, or ends with `token`,
`accesskey`, `secretkey`, `apikey`, `privatekey`. `key` and `token` are common words, so they
count only as the whole name or the end of it (`session_token`, not `token_shape`/`retokenize`).
Credentials inside URLs (`scheme://user:pass@host`) are masked too.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_EXACT = {"key", "secret", "token", "password", "pass", "pwd"}
_CONTAINS = ("secret", "password", "passwd", "credential")
_ENDS = ("token", "accesskey", "secretkey", "apikey", "privatekey")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s:]*:[^/@\s]*@")


def is_secret_key(name: Any) -> bool:
    norm = re.sub(r"[-_.\s]", "", str(name).lower())
    return norm in _EXACT or any(word in norm for word in _CONTAINS) or norm.endswith(_ENDS)


def redact(obj: Any) -> Any:
    """A copy of `obj` (nested dicts/lists/tuples) with secret-looking keys' values replaced by
    "***" (None and "" stay: nothing to hide) and URL passwords masked; other values unchanged."""
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(k) and not _empty(v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    if isinstance(obj, str) and "@" in obj:
        return _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", obj)
    return obj


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value)
