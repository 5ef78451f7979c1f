"""`tokenmill convert REF OUT`: a published checkpoint (`taming:…`, `llamagen:…`, `magvit2:…`) written once as a tokenmill model
folder (config.json + model.safetensors), the same bytes the resolver converts in memory, so the
folder and the reference tokenize to identical stores and carry the same lineage.
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.models import converters
from tokenmill.models.errors import UserError
from tokenmill.models.serialization import CONFIG_FILE, WEIGHTS_FILE
from tokenmill.pipeline.registry.model_ref import resolve_model
from tokenmill.pipeline.runtime.storage import filesystem, join


def convert_checkpoint(ref: str, out: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Write the converted model of `ref` to the folder or fsspec URL `out`; returns the summary
    (class, weights sha256, where it came from)."""
    if not converters.is_converted(ref):
        raise UserError(f"{ref} is not a published checkpoint reference; convert takes "
                        f"{', '.join(p + 'PATH' for p in converters.PREFIXES)}")
    files = resolve_model(ref)
    fs, path = filesystem(out, storage_options)
    fs.makedirs(path, exist_ok=True)
    # Weights first: a folder without config.json is no model, so an interrupted convert is never taken for one.
    fs.pipe_file(join(path, WEIGHTS_FILE), files.weights)
    fs.pipe_file(join(path, CONFIG_FILE), files.config)
    meta = json.loads(files.config)
    return {"source": ref, "out": out, "class": meta["class"], "weights_sha256": files.weights_sha256,
            "converted_from": meta["extra"]["converted_from"]}
