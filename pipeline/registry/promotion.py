"""Champion vs challenger: score both on the fixed validation shards, decide, record, promote.

Scores come from training's own validation code (`pipeline.training.tasks.image_validation`) run over the
fixed shards on a registered model version, in Ray tasks with the training's resources
(`pipeline.registry.scoring`), so champion and challenger are measured by the same code on the same
images: VQ family PSNR and codebook usage over the whole split, VAE family importance-weighted NLL
with seeded samples. Deterministic for a given model.

The deciding metric is `promotion.metric` (psnr / nll_nats by default) in its direction; LPIPS
and the downstream `prior_bits` are added to the scores when they decide (pipeline.registry.downstream).

What a decision leaves in MLflow:
  - on the challenger's model version and its training run, under `tokenmill.retrain.`:
    decision, reason, data_version, champion_version, decided_by, direction, margin,
    challenger_scores, champion_scores (JSON), and after a promotion store (the new token
    store's URL) and store_complete;
  - on the challenger's run, the decision table (every metric of both models, which one
    decided): the table artifact `retrain/decision_table.json`;
  - on the registered model, once per data version, `tokenmill.decided/<data version>`: the
    idempotency record, written last (after the alias move and the tags) so that it exists only
    for a decision that fully happened.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tokenmill.pipeline.registry.config import METRICS, RetrainConfig

TAG = "tokenmill.retrain."
DECIDED = "tokenmill.decided/"
TABLE_ARTIFACT = "retrain/decision_table.json"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str = ""  # the score key that decided
    higher_is_better: bool = True
    margin: float = 0.0
    # One row per metric either model has: {metric, challenger, champion, higher_is_better,
    # better ("challenger" | "champion" | "tie" | None), decided}.
    table: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": "max" if self.higher_is_better else "min",
                "margin": self.margin, "table": list(self.table)}


# -- scoring ------------------------------------------------------------------------------------

def score(model_ref: str, tracking_uri: str, config: RetrainConfig) -> dict[str, float]:
    """Validation metrics of model `model_ref` (e.g. models:/name/3) on the fixed shards, plus the
    deciding metric when it is not one of training's (`pipeline.registry.downstream`), in this
    process; retrain computes the same numbers on Ray workers (`pipeline.registry.scoring`)."""
    from tokenmill.pipeline.registry import scoring

    return scoring.score_in_process(model_ref, tracking_uri, config)


def validation_folder(config: RetrainConfig) -> str:
    """The fixed validation shards' folder; a built-in source is sharded once under
    run.root/shards/<name>, like a train config's data."""
    from tokenmill.pipeline.shards.sources import BUILTIN_SOURCES
    from tokenmill.pipeline.training.tasks.image_data import materialize_builtin

    shards = config.validation.shards
    return materialize_builtin(shards, config.run.root) if shards in BUILTIN_SOURCES else shards


def validation_shard_urls(config: RetrainConfig) -> list[str]:
    """The fixed validation split's shard URLs; UserError when its manifest is missing."""
    from tokenmill.pipeline.shards.manifest import shards_for_split

    return shards_for_split(validation_folder(config), config.validation.split, config.data.storage_options)


# -- deciding -----------------------------------------------------------------------------------

def decide(config: RetrainConfig, challenger: dict[str, float], champion: dict[str, float] | None) -> Decision:
    """Promote iff the challenger's `promotion.metric` beats the champion's by more than the margin
    in the metric's direction (a tie keeps the champion), its score is finite and (VQ) its codebook
    usage reaches the floor. The decision carries the table of every metric of both models."""
    metric, margin, higher = config.metric, config.promotion.margin, config.higher_is_better
    made = lambda promote, reason: Decision(promote, reason, metric, higher, margin,  # noqa: E731
                                            decision_table(challenger, champion, metric, higher))
    value = challenger.get(metric, math.nan)
    if not math.isfinite(value):
        return made(False, f"challenger {metric} is {value}")
    usage = min((v for k, v in challenger.items() if k.startswith("val/usage")), default=None)
    if usage is not None and usage < config.promotion.usage_floor:
        return made(False, f"challenger codebook usage {usage:.3f} is below the floor {config.promotion.usage_floor}")
    if champion is None:
        return made(True, f"no {config.promotion.alias} yet; challenger {metric} {value:.4f}")
    gain = value - champion[metric] if higher else champion[metric] - value
    verdict = "wins" if gain > margin else "does not win"
    return made(gain > margin, f"challenger {metric} {value:.4f} vs {config.promotion.alias} "
                               f"{champion[metric]:.4f}: {verdict} on {metric} ({'higher' if higher else 'lower'} "
                               f"is better; gain {gain:+.4f}, margin {margin})")


def decision_table(challenger: dict[str, float], champion: dict[str, float] | None, decided: str,
                   higher: bool) -> tuple[dict[str, Any], ...]:
    """A row per metric of either model, in name order; `better` where the direction is known
    (the deciding metric's configured one, else METRICS')."""
    known = {key: up for key, up in METRICS.values()} | {decided: higher}
    rows = []
    for name in sorted(set(challenger) | set(champion or {})):
        mine, theirs, up = challenger.get(name), (champion or {}).get(name), known.get(name)
        better = None
        if up is not None and mine is not None and theirs is not None:
            better = "tie" if mine == theirs else "challenger" if (mine > theirs) == up else "champion"
        rows.append({"metric": name, "challenger": mine, "champion": theirs, "higher_is_better": up,
                     "better": better, "decided": name == decided})
    return tuple(rows)


def log_decision_table(client, run_id: str, decision: Decision) -> None:
    """The table as an MLflow table artifact of the challenger's run (`retrain/decision_table.json`)."""
    columns = ("metric", "challenger", "champion", "higher_is_better", "better", "decided")
    client.log_table(run_id, {c: [row[c] for row in decision.table] for c in columns}, TABLE_ARTIFACT)


# -- the registry -------------------------------------------------------------------------------

def champion_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points to, or None (no alias, or no registered model yet)."""
    model = _registered_model(client, name)
    version = model.aliases.get(alias) if model else None
    return None if version is None else str(version)


def decided(client, name: str, data_version: str) -> dict[str, str] | None:
    """The decision already taken for `data_version` ({"decision", "model_version", "run_id"}), if any."""
    model = _registered_model(client, name)
    record = model.tags.get(DECIDED + data_version) if model else None
    return json.loads(record) if record else None


def record(client, name: str, version: str, run_id: str, tags: dict[str, str]) -> None:
    """Tag the challenger's model version and its run alike (keys prefixed with `tokenmill.retrain.`)."""
    from tokenmill.pipeline.runtime.redaction import redact

    for key, value in redact(tags).items():
        client.set_model_version_tag(name, version, TAG + key, value)
        client.set_tag(run_id, TAG + key, value)


def decision_tags(data_version: str, decision: Decision, champion: str | None,
                  challenger_scores: dict[str, float], champion_scores: dict[str, float] | None) -> dict[str, str]:
    return {"decision": "promoted" if decision.promote else "kept", "reason": decision.reason,
            "data_version": data_version, "champion_version": champion or "none",
            "decided_by": decision.metric, "direction": "max" if decision.higher_is_better else "min",
            "margin": str(decision.margin),
            "challenger_scores": json.dumps(challenger_scores, sort_keys=True),
            "champion_scores": json.dumps(champion_scores, sort_keys=True) if champion_scores else "none"}


def mark_decided(client, name: str, data_version: str, version: str, run_id: str, promoted: bool) -> None:
    """The idempotency record of `data_version`: written last, after the alias move and the tags."""
    client.set_registered_model_tag(name, DECIDED + data_version, json.dumps(
        {"decision": "promoted" if promoted else "kept", "model_version": version, "run_id": run_id}))


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
