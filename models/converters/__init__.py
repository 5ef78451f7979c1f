"""Published checkpoints as tokenmill models: `PREFIX:LOCATION` (e.g. `taming:logs/vqgan/`) is converted
into tokenmill's own model classes, in memory, by the source's module.

A source is one module in this package with `convert(location, ref) -> Converted`: it reads the
published checkpoint and config, translates the config into a tokenmill config, and maps the
state dict onto the tokenmill model (`checkpoint.load_mapped`). Adding one is that
module plus one line in SOURCES. The model resolver (`pipeline.registry.model_ref`) calls
`convert` for these prefixes, so every command that takes a model takes them.
"""

from __future__ import annotations

import importlib

from tokenmill.models.converters.checkpoint import Converted

SOURCES = {  # prefix -> module with `convert`
    "taming:": "tokenmill.models.converters.taming",
    "llamagen:": "tokenmill.models.converters.llamagen",
    "magvit2:": "tokenmill.models.converters.magvit2",
}
PREFIXES = tuple(SOURCES)


def is_converted(ref: str) -> bool:
    """Whether `ref` names a published checkpoint that is converted on load."""
    return ref.startswith(PREFIXES)


def convert(ref: str) -> Converted:
    """The tokenmill model (eval mode) of `PREFIX:LOCATION` and where it came from; UserError when the
    checkpoint or its config is missing, unreadable or of another architecture."""
    prefix = next(p for p in PREFIXES if ref.startswith(p))
    module = importlib.import_module(SOURCES[prefix])
    return module.convert(ref[len(prefix):], ref)


__all__ = ["PREFIXES", "SOURCES", "Converted", "convert", "is_converted"]
