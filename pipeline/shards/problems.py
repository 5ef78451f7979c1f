"""Why a sample or a shard was skipped: one record shape and one vocabulary of reasons.

Every reader of shards (the training stream, tokenization, the manifest scan and
`inspect --verify`) reports a bad sample as `ShardError(shard, key, reason)`, i.e.
{"shard", "key", "reason"}. A reason is one of the kinds below, optionally followed by
": detail" (`reason(kind, detail)`); `kind_of(reason)` gives the kind back for counting.
"""

from __future__ import annotations

from dataclasses import dataclass

# The tar itself (key: the sample being read when the damage was hit, "" if none).
EMPTY_TAR = "empty tar"
NOT_A_TAR = "not a tar archive"
TRUNCATED_TAR = "truncated tar"
# A sample of a readable tar.
NO_IMAGE = "no image member"
NOT_AN_IMAGE = "not an image"
CORRUPT_IMAGE = "corrupt image data"
TOO_MANY_PIXELS = "too many pixels"
DECOMPRESSION_BOMB = "decompression bomb"
EMPTY_IMAGE = "empty image"
# Metadata members (checked by the manifest scan only; the stream reads a bad `cls` as label -1).
BAD_CLS = "cls is not a non-negative integer"
BAD_JSON = "json member is not valid JSON"
# A shard against its manifest entry (`inspect --verify`).
SHARD_MISSING = "shard is missing"
SHA256_DIFFERS = "sha256 differs from the manifest"
COUNT_DIFFERS = "count differs from the manifest"


def reason(kind: str, detail: object = "") -> str:
    """`kind`, or `kind: detail` when there is a detail."""
    return f"{kind}: {detail}" if detail != "" else kind


def kind_of(text: str) -> str:
    """The kind a reason starts with (the text before the first colon)."""
    return text.split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class ShardError:
    """One skipped sample (or damage to the shard itself, then `key` may be "")."""

    shard: str
    key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"shard": self.shard, "key": self.key, "reason": self.reason}
