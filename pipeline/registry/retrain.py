"""One scheduled retraining round (infra/kuberay/raycronjob-retrain.yaml runs it daily):

 1. find the newest data version under `versions.prefix` (pipeline.shards.versions);
    if it was already decided, say so and stop (finishing an interrupted re-tokenization);
 2. train a challenger on it with `pipeline.training.driver.train`, warm-started from the champion's weights
    when `promotion.warm_start` and the architectures match;
 3. score the challenger on the fixed validation shards, in Ray tasks with the training's resources
    (pipeline.registry.scoring: the driver loads no model and decodes no image); then, holding the promotion lock,
    re-check that no other run decided this data version meanwhile, score the current champion
    the same way, decide on `promotion.metric` (PSNR by default; LPIPS, usage, the downstream
    prior_bits, ...), tag the challenger's run and model version, log the decision table, move
    the alias on a win and record the data version as decided (pipeline.registry.promotion,
    pipeline.registry.downstream, pipeline.registry.lock);
 4. after a promotion, tokenize the data version with the new champion into a new store
    `<retokenize.out_prefix>/<data version>/<model>-v<version>`.

A failed step leaves the alias where it was and exits 1 with one line naming the step (2 for a
user mistake: bad config, missing data). Training is per attempt (its own run name), so two
runs started together each train, and the lock makes sure at most one of them decides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator

from tokenmill.models.errors import UserError

if TYPE_CHECKING:
    from tokenmill.pipeline.training.driver import TrainSummary


class StepFailed(RuntimeError):
    """A retrain step failed for a reason other than a user mistake; the message is one line."""


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Name the step in any failure: UserErrors stay UserErrors (exit 2), the rest become StepFailed."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure ends the run with one line
        raise StepFailed(f"{name} failed: {_one_line(err)}") from err


@dataclasses.dataclass
class RetrainResult:
    """One round's outcome; `to_json()` is what `tokenmill retrain --json` writes."""

    data_version: str
    champion_version: str | None  # the champion when the round decided (or started)
    promoted: bool = False
    store_url: str | None = None  # the re-tokenized store after a promotion
    challenger_scores: dict[str, float] | None = None
    champion_scores: dict[str, float] | None = None
    model_version: str | None = None  # the challenger's registered version
    mlflow_run_id: str | None = None  # the challenger's training run
    warm_started_from: str | None = None  # models:/<name>/<champion version>, or None (from scratch)
    decision: str = ""  # promoted | kept | superseded | already-decided
    # The deciding metric, its direction, the margin and the decision table (every metric of both models)
    promotion: dict[str, Any] | None = None
    reason: str = ""
    # Where the scores were computed: {"driver_pid", "challenger": [...], "champion": [...]}, each
    # task's {"node", "pid", "gpus", "shards" (or "metric")} (pipeline.registry.scoring)
    scored_on: dict[str, Any] = dataclasses.field(default_factory=lambda: {"driver_pid": os.getpid()})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _one_line(err: BaseException) -> str:
    """`Type: message`; for a multi-line message (Ray wraps worker tracebacks) its first line and
    its last, which names the root cause, e.g. "RuntimeError: injected failure at step 1"."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')} ... {lines[-1]}"
    return f"{type(err).__name__}: {text}"


def retrain(config) -> RetrainResult:
    from tokenmill.pipeline.registry import downstream, promotion, tracking
    from tokenmill.pipeline.registry import lock as registry_lock
    from tokenmill.pipeline.shards.versions import newest_version

    name, alias = config.registered_model, config.promotion.alias
    with step("checking promotion.metric"):  # a metric that cannot be computed: refused before anything
        downstream.check_metric(config)
    with step("finding the newest data version"):  # data first: a wrong prefix fails before any work
        data = newest_version(config.versions.prefix, config.data.storage_options)
    with step("checking the validation shards"):  # scored only after training: check them now
        promotion.validation_shard_urls(config)
    with step("connecting to MLflow"):
        tracking_uri = tracking.resolve_tracking_uri(config.tracking.tracking_uri, config.run.root)
        tracking.require_reachable(tracking_uri)
        client = tracking.client(tracking_uri)
    with step("reading the registry"):
        already = promotion.decided(client, name, data.name)
        champion = promotion.champion_version(client, name, alias)
    result = RetrainResult(data_version=data.name, champion_version=champion)
    if already:
        return _already_decided(config, client, tracking_uri, data, already, result)

    with step("training the challenger"):
        init_from = _warm_start_ref(config, champion, tracking_uri)
        run_name = f"{config.run.name}-{data.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        summary = _train(config.challenger_config(data.url, run_name, init_from, tracking_uri))
    version, run_id = summary.model_version, summary.mlflow_run_id
    result.model_version, result.mlflow_run_id, result.warm_started_from = version, run_id, init_from
    with step("scoring the challenger"):
        result.challenger_scores = _score(result, "challenger", f"models:/{name}/{version}", tracking_uri, config)

    with step("deciding"), registry_lock.acquire(client, f"{name}.retrain-lock", config.promotion.lock_expiry_s,
                                                 config.promotion.lock_wait_s) as lock:
        other = promotion.decided(client, name, data.name)
        if other:  # another run decided this data version while we trained
            reason = f"data version {data.name} was decided by another run meanwhile (version {other['model_version']})"
            promotion.record(client, name, version, run_id, {"decision": "superseded", "reason": reason,
                                                             "data_version": data.name})
            return _finish(result, "superseded", reason)
        champion = result.champion_version = promotion.champion_version(client, name, alias)
        if champion:
            result.champion_scores = _score(result, "champion", f"models:/{name}/{champion}", tracking_uri, config)
        decision = promotion.decide(config, result.challenger_scores, result.champion_scores)
        lock.check()  # the alias moves only while the lock is provably ours
        if decision.promote:
            client.set_registered_model_alias(name, alias, version)
        promotion.record(client, name, version, run_id, promotion.decision_tags(
            data.name, decision, champion, result.challenger_scores, result.champion_scores))
        promotion.log_decision_table(client, run_id, decision)
        result.promotion = decision.to_json()
        promotion.mark_decided(client, name, data.name, version, run_id, decision.promote)
    result.promoted = decision.promote

    if decision.promote:
        with step(f"re-tokenizing {data.name} with {name} v{version} (promoted; rerun to resume)"):
            result.store_url = _retokenize(config, client, tracking_uri, data, version, run_id)
    return _finish(result, "promoted" if decision.promote else "kept", decision.reason)


def _score(result: RetrainResult, role: str, model_ref: str, tracking_uri: str, config) -> dict[str, float]:
    """Model `model_ref`'s scores, computed by Ray tasks on the workers; where they ran goes into `result`."""
    from tokenmill.pipeline.registry.scoring import score_on_workers

    scores, result.scored_on[role] = score_on_workers(model_ref, tracking_uri, config)
    return scores


def _train(train_config) -> TrainSummary:
    from tokenmill.pipeline.training.driver import train

    return train(train_config)


def _warm_start_ref(config, champion: str | None, tracking_uri: str) -> str | None:
    """`models:/<name>/<champion version>` when warm-starting applies: a fixed version, so a
    promotion by another run during training changes nothing. None when the champion's
    architecture differs from `model` (a changed config trains from scratch, and says so)."""
    if not (config.promotion.warm_start and champion):
        return None
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.registry.model_ref import resolve_model

    ref = f"models:/{config.registered_model}/{champion}"
    weights = resolve_model(ref, tracking_uri).load()[0].state_dict()
    fresh = build_model(config.model).state_dict()
    if {k: v.shape for k, v in weights.items()} != {k: v.shape for k, v in fresh.items()}:
        print(f"retrain: {ref} has another architecture than `model`; training the challenger from scratch",
              file=sys.stderr)
        return None
    return ref


def _retokenize(config, client, tracking_uri: str, data, version: str, run_id: str) -> str:
    """Tokenize data version `data` with model `version` into its own store; resumable."""
    from tokenmill.pipeline.registry import promotion
    from tokenmill.pipeline.runtime.storage import join
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    name = config.registered_model
    store = join(config.retokenize.out_prefix, f"{data.name}/{name}-v{version}")
    promotion.record(client, name, version, run_id, {"store": store})
    retokenize = config.retokenize
    options = TokenizeOptions(batch_size=retokenize.batch_size, actors=retokenize.actors, gpus=retokenize.gpus,
                              precision=retokenize.precision, tracking_uri=tracking_uri,
                              storage_options=config.data.storage_options)
    tokenize_dataset(f"models:/{name}/{version}", data.url, store, options)
    promotion.record(client, name, version, run_id, {"store_complete": "true"})
    return store


def _already_decided(config, client, tracking_uri: str, data, record: dict[str, str],
                     result: RetrainResult) -> RetrainResult:
    """A rerun for a decided data version does nothing, except finish the re-tokenization of a
    promotion whose tokenize step failed."""
    from tokenmill.pipeline.registry.promotion import TAG

    version = record["model_version"]
    tags = client.get_model_version(config.registered_model, version).tags
    result.model_version, result.promoted, result.store_url = version, False, tags.get(TAG + "store")
    reason = f"data version {data.name} was already decided: {record['decision']} version {version}; nothing to do"
    if record["decision"] == "promoted" and tags.get(TAG + "store_complete") != "true":
        with step(f"re-tokenizing {data.name} with {config.registered_model} v{version} (resumed)"):
            result.store_url = _retokenize(config, client, tracking_uri, data, version, record["run_id"])
        reason = f"data version {data.name} was already decided (promoted version {version}); finished its re-tokenization"
    return _finish(result, "already-decided", reason)


def _finish(result: RetrainResult, decision: str, reason: str) -> RetrainResult:
    result.decision, result.reason = decision, reason
    print(f"retrain {result.data_version}: {decision}: {reason}")
    if result.store_url:
        print(f"  token store {result.store_url}")
    return result
