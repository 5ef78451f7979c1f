"""The multi-node refusal of node-local storage (pipeline.training.cluster_check), without Ray:
the node count is given. tests/system/test_multinode.py checks the same refusal on a real 5-node cluster."""

from __future__ import annotations

import pytest
from helpers import CONFIGS

from tokenmill.models.errors import UserError
from tokenmill.pipeline.training.cluster_check import check_cluster_storage, local_storage_problems
from tokenmill.pipeline.training.config import load_train_config

CONFIG = CONFIGS / "debug_vqvae.yaml"
SHARED = ["data.shards=s3://b/shards", "run.storage_path=s3://b/ray", "tracking.tracking_uri=http://mlflow:5000"]


def config(*overrides: str):
    return load_train_config(CONFIG, list(overrides))


def data(cfg) -> dict[str, str]:
    """What the tokenizer task says its ranks read (`Task.shared_data`)."""
    return {"data.shards": cfg.data.shards}


@pytest.mark.parametrize(("override", "key", "hint"), [
    ("data.shards=builtin:mnist5k", "data.shards=builtin:mnist5k", "tokenmill shard builtin:mnist5k s3://"),
    ("data.shards=/data/shards", "data.shards=/data/shards", "copy it to s3://"),
    ("data.shards=file:///data/shards", "data.shards=file:///data/shards", "copy it to s3://"),
    ("run.storage_path=/ckpt", "run.storage_path=/ckpt", "set it to an s3:// URL"),
    ("tracking.tracking_uri=sqlite:///m.db", "tracking.tracking_uri=sqlite:///m.db", "an MLflow server"),
    ("tracking.tracking_uri=./mlruns", "tracking.tracking_uri=./mlruns", "an MLflow server"),
])
def test_each_node_local_setting_is_refused_with_its_own_message(override, key, hint, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(*SHARED, override)
    with pytest.raises(UserError) as err:
        check_cluster_storage(cfg, data(cfg), nodes=3)
    message = str(err.value)
    assert "3 nodes" in message and key in message and hint in message and "run.shared_storage=true" in message
    assert "\n" not in message and len(local_storage_problems(cfg, data(cfg))) == 1


def test_shared_urls_a_single_node_and_declared_shared_storage_pass(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_cluster_storage(config(*SHARED), data(config(*SHARED)), nodes=3)
    local = config()  # builtin data, local checkpoints, SQLite under the run directory
    assert len(local_storage_problems(local, data(local))) == 3
    check_cluster_storage(local, data(local), nodes=1)
    check_cluster_storage(config("run.shared_storage=true"), data(local), nodes=3)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the environment counts too
    assert not local_storage_problems(config(*SHARED[:2]), data(config(*SHARED[:2])))


def test_a_priors_local_store_is_refused_by_its_own_key(monkeypatch):
    from tokenmill.pipeline.prior.config import load_prior_config
    from tokenmill.pipeline.training.tasks.prior import PriorTask

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prior = load_prior_config(CONFIG.parent / "prior_mnist.yaml", SHARED[1:])  # data.store runs/demo/tokens.zarr
    with pytest.raises(UserError, match=r"data\.store=runs/demo/tokens\.zarr is a local path"):
        check_cluster_storage(prior, PriorTask(prior).shared_data(), nodes=2)
