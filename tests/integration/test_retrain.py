"""`tokenmill retrain` end to end with local Ray and a real `mlflow server`: the first run promotes
(over a champion whose codes a prior cannot predict, on `promotion.metric: prior_bits`),
a rerun on the same data version is a no-op, a challenger that does not win keeps the champion,
a failed step leaves the champion untouched, and two runs racing for the lock promote once.
Plus the registry lock on its own. (Data version discovery and the decision rule:
tests/unit/test_retrain_parts.py; a misspelt config: tests/system/test_job_cli.py.)"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import mlflow
import pytest
from helpers import CONFIGS
from helpers.jobs import write_digits_shards

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.registry import lock as registry_lock
from tokenmill.pipeline.registry import promotion
from tokenmill.pipeline.registry.config import load_retrain_config
from tokenmill.pipeline.shards.manifest import read_manifest

CONFIG = str(CONFIGS / "debug_retrain_vqvae.yaml")
DIGITS = 1797  # samples in builtin:digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """builtin:digits as PNG shards of 600 with a manifest (a data version, and the fixed val split)."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"), 600)


class Setup:
    """One registered model's world: its data versions, token stores and retrain overrides.
    Each data version lives under a prefix of its own (`versions_with`), so a test sees exactly
    the version it names whichever tests ran before it (the registry is what they share)."""

    def __init__(self, root: Path, digits: Path, tracking_uri: str, model: str, validation: str | None = None):
        self.root, self.digits, self.tracking_uri, self.model = root, digits, tracking_uri, model
        self.validation = validation or str(digits)
        self.client = mlflow.MlflowClient(tracking_uri)

    def versions_with(self, name: str) -> Path:
        """A versions prefix holding only data version `name` (a copy of the digits shards)."""
        prefix = self.root / f"versions-{name}"
        if not (prefix / name).exists():
            shutil.copytree(self.digits, prefix / name)  # shard URLs are relative: a copy is valid
        return prefix

    def overrides(self, version: str, *extra: str) -> list[str]:
        # The challenger trains in this process: retrain's decisions are the point here, and the
        # same workflow trains on Ray in tests/system/test_multinode.py (a submitted retrain job).
        return ["scaling.in_process=true", f"versions.prefix={self.versions_with(version)}",
                f"validation.shards={self.validation}",
                f"retokenize.out_prefix={self.root / 'tokens'}", f"run.root={self.root / 'runs'}",
                f"tracking.tracking_uri={self.tracking_uri}", f"tracking.registered_model={self.model}", *extra]

    def cli(self, version: str, *extra: str) -> tuple[int, dict]:
        """`tokenmill retrain` with data version `version` the newest: (exit code, its --json)."""
        out = self.root / f"decision-{len(list(self.root.glob('decision-*')))}.json"
        overrides = self.overrides(version, *extra)
        args = ["retrain", CONFIG, *[a for o in overrides for a in ("--set", o)], "--json", str(out)]
        try:
            code = cli_main(args)
        except SystemExit as exit_:
            code = exit_.code
        return code, json.loads(out.read_text()) if out.exists() else {}

    def champion(self) -> str | None:
        return promotion.champion_version(self.client, self.model, "champion")

    def versions(self) -> list:
        return self.client.search_model_versions(f"name='{self.model}'")

    def version_tags(self, version: str) -> dict[str, str]:
        return self.client.get_model_version(self.model, version).tags


@pytest.fixture(scope="module")
def world(ray_local, mlflow_server, digits, tmp_path_factory) -> Setup:
    """Shared by the tests below (they build on one registry; none changes this object), with
    the fixed validation set given as builtin:digits, which retrain shards once under run.root."""
    return Setup(tmp_path_factory.mktemp("retrain"), digits, mlflow_server, "retrain-a", "builtin:digits")


# The first round decides on prior_bits (pipeline.registry.downstream) with a small fixed budget.
PRIOR_BITS = ["promotion.metric=prior_bits", "promotion.margin=1.0", "promotion.prior.steps=20",
              "promotion.prior.batch_size=16", "promotion.prior.dim=32", "promotion.prior.depth=1",
              "promotion.prior.heads=1"]


def register_hashing_champion(world: Setup) -> str:
    """An untrained VQ-VAE with LFQ codes (2^8: the signs of 8 latent channels) behind a random
    encoder of high gain, registered as the champion: its codes are a near-hash of the image
    around each position, so the budget's prior gets to ~5 bits/token on them, where the trained
    32-code challenger's few used codes take ~2 (measured: 5.0 vs 2.25, margin 1.0)."""
    import torch

    from tokenmill.models import save_model
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.registry import tracking

    torch.manual_seed(0)
    model = build_model({"kind": "vqvae", "in_channels": 1, "image_size": 16, "hidden": 16, "res_blocks": 1,
                         "downsample": 4, "latent_dim": 8, "quantizer": {"kind": "lfq", "bits": 8}})
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            parameter.mul_(4)
    transform = load_retrain_config(CONFIG).data.transform.for_eval().model_dump(mode="json")
    folder = save_model(model.eval(), world.root / "hashing-champion", extra={"transform": transform})
    run_id = tracking.get_or_create_run(world.tracking_uri, "tokenmill-retrain", "hashing-champion", tags={},
                                        run_dir=world.root / "hashing-champion-run")
    version = tracking.register_model_dir(world.tracking_uri, run_id, folder, world.model, tags={})
    world.client.set_registered_model_alias(world.model, "champion", version)
    return version


@pytest.fixture(scope="module")
def first(world) -> dict:
    """The first round: a challenger trained from scratch (the champion's architecture differs)
    against the hashing champion, decided on prior_bits."""
    champion = register_hashing_champion(world)
    code, decision = world.cli("v001", *PRIOR_BITS)
    assert code == 0
    decision["hashing_champion"] = champion
    return decision


def test_first_retrain_promotes_on_prior_bits_and_retokenizes(world, first):
    from tokenmill.pipeline.tokens.store import TokenStore

    version = first["model_version"]
    assert first["promoted"] is True and first["decision"] == "promoted"
    assert first["data_version"] == "v001" and first["champion_version"] == first["hashing_champion"]
    assert first["warm_started_from"] is None  # the champion's architecture differs: trained from scratch
    assert world.champion() == version
    # The challenger's codes are far more predictable: fewer bits per token by more than the margin.
    bits = "downstream/prior_bits"
    assert first["challenger_scores"][bits] + 1.0 < first["champion_scores"][bits]
    assert "wins on downstream/prior_bits" in first["reason"]
    decided = first["promotion"]
    assert (decided["metric"], decided["direction"], decided["margin"]) == (bits, "min", 1.0)
    rows = {row["metric"]: row for row in decided["table"]}
    assert [name for name, row in rows.items() if row["decided"]] == [bits]
    assert rows[bits]["better"] == "challenger" and rows[bits]["champion"] == first["champion_scores"][bits]
    assert {"val/psnr", "val/usage"} <= set(rows)  # every metric of both models, not only the deciding one
    table = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=first["mlflow_run_id"], artifact_path=promotion.TABLE_ARTIFACT, tracking_uri=world.tracking_uri,
        dst_path=str(world.root / "table"))).read_text())
    assert bits in json.dumps(table) and "decided" in table["columns"]
    tags = world.version_tags(version)
    assert tags["tokenmill.retrain.decision"] == "promoted" and tags["tokenmill.retrain.decided_by"] == bits
    assert tags["tokenmill.retrain.data_version"] == "v001"
    assert json.loads(tags["tokenmill.retrain.challenger_scores"]) == first["challenger_scores"]
    run_tags = world.client.get_run(first["mlflow_run_id"]).data.tags
    assert run_tags["tokenmill.retrain.decision"] == "promoted" and run_tags["tokenmill.retrain.data_version"] == "v001"
    # The new store is versioned by data and model version and holds every sample, encoded by the champion.
    assert first["store_url"] == str(world.root / "tokens" / "v001" / f"retrain-a-v{version}")
    store = TokenStore(first["store_url"])
    assert len(store.item_rows()) == DIGITS
    assert store.attrs()["lineage"]["model_version"] == f"retrain-a/{version}"
    assert tags["tokenmill.retrain.store_complete"] == "true"
    assert read_manifest(str(world.root / "runs" / "shards" / "digits"))["complete"]  # builtin validation set
    # Both models were scored by Ray tasks, not by the driver (pipeline.registry.scoring); prior_bits too.
    scored = first["scored_on"]
    for role in ("challenger", "champion"):
        assert scored[role] and all(task["node"] and task["pid"] != scored["driver_pid"] for task in scored[role])
    assert [task["metric"] for task in scored["challenger"] if "metric" in task] == [bits]
    assert sorted(i for task in scored["challenger"] for i in task.get("shards", [])) == [0]  # the one val shard


def test_second_run_on_the_same_data_version_is_a_noop(world, first):
    versions_before = len(world.versions())
    code, decision = world.cli("v001")
    assert code == 0
    assert decision["decision"] == "already-decided" and decision["promoted"] is False
    assert "already decided" in decision["reason"] and decision["model_version"] == first["model_version"]
    assert decision["store_url"] == first["store_url"]
    assert len(world.versions()) == versions_before  # nothing was trained or registered
    assert world.champion() == first["model_version"]


def test_challenger_that_does_not_win_keeps_the_champion(world, first):
    """Warm-started from the champion and trained one more step: close to it, but a margin of
    1000 dB cannot be won; the alias stays, and the decision is recorded on the version."""
    code, decision = world.cli("v002", "train.steps=1", "promotion.margin=1000")
    assert code == 0
    assert decision["promoted"] is False and decision["decision"] == "kept" and decision["store_url"] is None
    assert decision["data_version"] == "v002" and decision["champion_version"] == first["model_version"]
    assert world.champion() == first["model_version"]
    # The champion was scored again on the same shards by the same code: the same numbers
    # (prior_bits decided the first round only).
    assert decision["champion_scores"] == {k: v for k, v in first["challenger_scores"].items() if k.startswith("val/")}
    assert decision["warm_started_from"] == f"models:/retrain-a/{first['model_version']}"
    assert abs(decision["challenger_scores"]["val/psnr"] - first["challenger_scores"]["val/psnr"]) < 1.0
    tags = world.version_tags(decision["model_version"])
    assert tags["tokenmill.retrain.decision"] == "kept" and tags["tokenmill.retrain.data_version"] == "v002"
    assert "does not win" in tags["tokenmill.retrain.reason"]
    assert tags["tokenmill.retrain.champion_version"] == first["model_version"]
    assert promotion.decided(world.client, "retrain-a", "v002")["decision"] == "kept"


def test_failed_step_leaves_the_champion_untouched(world, first, monkeypatch, capsys):
    champion_before = world.champion()
    monkeypatch.setenv("TOKENMILL_FAULTS", "train.step,step=1")  # the training loop raises at its first step
    code, decision = world.cli("v003", "promotion.margin=0")
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tokenmill retrain: error: training the challenger failed:") and "champion is unchanged" in err
    assert decision["promoted"] is False and decision["decision"] == "failed"
    assert world.champion() == champion_before
    assert promotion.decided(world.client, "retrain-a", "v003") is None  # a rerun will try again


def test_two_concurrent_runs_promote_at_most_once(ray_local, mlflow_server, digits, tmp_path, monkeypatch):
    """Two retrain runs in two threads: both train, then meet at the lock together (a barrier in
    front of it), so both pass the first "already decided?" check before either can decide. One
    promotes; the other finds the data version decided once it holds the lock. (The two trainings
    take turns only to keep a 2-core test machine responsive; the race is at the lock.)"""
    import tokenmill.pipeline.registry.retrain as retrain_flow

    setup = Setup(tmp_path, digits, mlflow_server, "retrain-race")
    config = load_retrain_config(CONFIG, setup.overrides("v001", "train.steps=3"))
    barrier, acquire = threading.Barrier(2, timeout=300), registry_lock.acquire
    one_training, train = threading.Lock(), retrain_flow._train

    def acquire_together(*args, **kwargs):
        barrier.wait()
        return acquire(*args, **kwargs)

    def train_in_turn(train_config):
        with one_training:
            return train(train_config)

    monkeypatch.setattr(registry_lock, "acquire", acquire_together)
    monkeypatch.setattr(retrain_flow, "_train", train_in_turn)
    results, errors = [], []

    def one_run():
        try:
            results.append(retrain_flow.retrain(config))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, [repr(e) for e in errors]
    assert sorted(r.decision for r in results) == ["promoted", "superseded"]
    winner = next(r for r in results if r.promoted)
    loser = next(r for r in results if not r.promoted)
    assert {winner.model_version, loser.model_version} == {"1", "2"}  # both trained
    assert setup.champion() == winner.model_version
    assert setup.version_tags(loser.model_version)["tokenmill.retrain.decision"] == "superseded"
    decided = [k for k in setup.client.get_registered_model("retrain-race").tags if k.startswith(promotion.DECIDED)]
    assert decided == [promotion.DECIDED + "v001"]


# -- the registry lock on its own -------------------------------------------------------------------

def test_lock_excludes_expires_and_is_never_released_by_a_former_holder(mlflow_server):
    client = mlflow.MlflowClient(mlflow_server)
    # A fresh server answers its first registry requests slowly; warm it first, or run first, this
    # test could see its short-lived lock expire before the LockBusy check.
    registry_lock.acquire(client, "lock-test-warm-up", expiry_s=60, wait_s=0).release()
    first = registry_lock.acquire(client, "lock-test", expiry_s=8.0, wait_s=0)
    with pytest.raises(registry_lock.LockBusy, match="held by"):
        registry_lock.acquire(client, "lock-test", expiry_s=60, wait_s=0)
    second = registry_lock.acquire(client, "lock-test", expiry_s=60, wait_s=30, poll_s=0.2)  # breaks it once expired
    with pytest.raises(registry_lock.LockLost):
        first.check()
    first.release()  # must not delete the lock it lost
    second.check()
    with pytest.raises(registry_lock.LockBusy):
        registry_lock.acquire(client, "lock-test", expiry_s=60, wait_s=0)
    second.release()
    registry_lock.acquire(client, "lock-test", expiry_s=60, wait_s=0).release()
