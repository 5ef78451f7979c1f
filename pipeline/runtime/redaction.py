"""Secrets stay out of records: `redact` is applied to every config or summary we RECORD (MLflow
params and tags, token-store lineage, `--json` summaries); the job itself keeps the real values.

A key is secret when its name (case-insensitive, `_`/`-`/`.` ignored) is exactly `secret`/
`password`/`pass`/`pwd`, contains `secret`/`password`/`passwd`/`credential`, or ends with `token`,
`accesskey`, `secretkey`, `apikey`, `privatekey` (`session_token`, not `token_shape`/`retokenize`,
nor a rate or metric `*_per_token` such as `val_bits_per_token`).
The bare names `key` and `token` are secret only inside options (a parent named `*options*`,
`*kwargs*`, `*credential*` or `*auth*`, like `storage_options`): elsewhere they are a sample's key
or a model's token. Credentials inside URLs (`scheme://user:pass@host`) are masked too.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_EXACT = {"secret", "password", "pass", "pwd"}
_EXACT_IN_OPTIONS = {"key", "token"}
_OPTIONS_PARENTS = ("option", "kwargs", "credential", "auth")
_CONTAINS = ("secret", "password", "passwd", "credential")
_ENDS = ("token", "accesskey", "secretkey", "apikey", "privatekey")
_METRIC_ENDS = ("pertoken",)  # `bits_per_token`: a measurement, not a credential
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s:]*:[^/@\s]*@")


def _norm(name: Any) -> str:
    return re.sub(r"[-_.\s]", "", str(name).lower())


def is_secret_key(name: Any, in_options: bool = False) -> bool:
    norm = _norm(name)
    if norm in _EXACT_IN_OPTIONS:
        return in_options
    ends = norm.endswith(_ENDS) and not norm.endswith(_METRIC_ENDS)
    return norm in _EXACT or any(word in norm for word in _CONTAINS) or ends


def redact(obj: Any, in_options: bool = False) -> Any:
    """A copy of `obj` (nested dicts/lists/tuples) with secret-looking keys' values replaced by
    "***" (None and "" stay: nothing to hide) and URL passwords masked; other values unchanged."""
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(k, in_options) and not _empty(v)
                else redact(v, in_options or any(word in _norm(k) for word in _OPTIONS_PARENTS))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, in_options) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v, in_options) for v in obj)
    if isinstance(obj, str) and "@" in obj:
        return _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", obj)
    return obj


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value)
