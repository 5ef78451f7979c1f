"""Fine-tuning lineage of a tokenizer (`train.init_from`, `train.freeze`), resolved on the driver.

The exported model's config.json carries it under `extra.lineage`:
    init_from, init_model_version, init_weights_sha256: where the starting weights came from;
    freeze: the frozen parts (models.freezing);
    and when the frozen parts cover everything the codes depend on (encoder, quant_conv, quantizer):
    code_parts_sha256: the hash of those weights (unchanged by training), and
    same_codes_as: the weights sha256 of every model whose codes this one reproduces (the starting
    model and, transitively, the models it reproduces) — how a store made by any of them accepts
    this model as its decoder (`tokenmill decode --model`: pipeline.tokens.detokenize._same_codes).
"""

from __future__ import annotations

from typing import Any

from tokenmill.models.freezing import code_parts_sha256, freeze, freezes_codes
from tokenmill.models.serialization import build_model
from tokenmill.pipeline.runtime.redaction import redact

LINEAGE_KEY = "lineage"


def finetune_lineage(config: Any, tracking_uri: str | None) -> dict[str, Any]:
    """The lineage of a run of `config` (a TrainJobConfig); {} without init_from and freeze.
    UserError on a wrong part name or a reference that does not resolve."""
    from tokenmill.pipeline.training.loop import initial_model_files

    loop = config.train
    model = build_model(config.model)
    parts = list(freeze(model, loop.freeze))  # a wrong name stops the job here
    if not loop.init_from:
        return {"freeze": parts} if parts else {}
    files = initial_model_files(loop.init_from, tracking_uri)
    source, meta = files.load()
    lineage: dict[str, Any] = {"init_from": redact(loop.init_from), "init_model_version": files.version,
                               "init_weights_sha256": files.weights_sha256, "freeze": parts}
    if freezes_codes(parts, model):
        code_sha = code_parts_sha256(source)
        previous = meta.get("extra", {}).get(LINEAGE_KEY, {})
        inherited = previous.get("same_codes_as", []) if previous.get("code_parts_sha256") == code_sha else []
        lineage |= {"code_parts_sha256": code_sha, "same_codes_as": [files.weights_sha256, *inherited]}
    return lineage


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of the run and the registered version: where the weights started, what was frozen."""
    tags = {"tokenmill.freeze": ",".join(lineage["freeze"])} if lineage.get("freeze") else {}
    if lineage.get("init_from"):
        tags |= {"tokenmill.init_from": lineage["init_from"], "tokenmill.init_weights_sha256": lineage["init_weights_sha256"]}
    return tags

