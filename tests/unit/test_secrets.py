"""Secrets stay secret, in this process: `redact` masks secret keys and URL passwords only, and
the token store's lineage and retrain tags are recorded redacted. (A training job on Ray reading
S3 with them: tests/integration/test_secrets_training.py.)"""

from __future__ import annotations

import json

import mlflow
import zarr
from helpers.credentials import KEY, SECRET, leaks

from tokenmill.pipeline.runtime.redaction import MASK, redact


def test_redact_masks_secret_keys_and_url_passwords_only():
    config = {"data": {"storage_options": {"key": "k", "secret": "s", "token": None, "AWS_Session_Token": "t",
                                           "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}},
              "creds": [{"api_key": "a", "password": "p", "aws_secret_access_key": "x", "credentials": {"a": 1}}],
              "tracking_uri": "https://alice:pw@mlflow.example/x", "token_shape": [[4, 4]],
              "retokenize": {"out_prefix": "s3://b/t"}, "sort_key": "label", "tokenmill_version": "1",
              "problems": [{"shard": "a.tar", "key": "sample-7", "reason": "no image member"}], "token": 5,
              "val_bits_per_token": 2.5}
    out = redact(config)
    options = out["data"]["storage_options"]
    assert options == {"key": MASK, "secret": MASK, "token": None, "AWS_Session_Token": MASK,
                       "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert out["creds"] == [{"api_key": MASK, "password": MASK, "aws_secret_access_key": MASK, "credentials": MASK}]
    assert out["tracking_uri"] == f"https://{MASK}@mlflow.example/x"
    # Common words stay, and outside options `key`/`token` are a sample's key or a model's token.
    for plain in ("token_shape", "retokenize", "sort_key", "tokenmill_version", "problems", "token",
                  "val_bits_per_token"):
        assert out[plain] == config[plain]
    assert config["data"]["storage_options"]["secret"] == "s"  # a copy: the job keeps the real values


def test_store_lineage_is_recorded_redacted(tmp_path):
    from tokenmill.pipeline.tokens.layout import plan_layout
    from tokenmill.pipeline.tokens.store import ArraySpec, TokenStore

    specs = [ArraySpec("codes", (2, 2), "uint16", 50)]
    layout = plan_layout([("a", "train", 5)], 8)
    lineage = {"model_uri": "m", "data": "s3://b/shards", "options": {"secret": SECRET}}
    store = TokenStore(str(tmp_path / "t.zarr"))
    store.prepare(lineage, layout, specs, overwrite=False)
    store.prepare(lineage, layout, specs, overwrite=False)  # the same run again: still matches
    recorded = zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["lineage"]
    assert recorded["options"] == {"secret": MASK} and recorded["model_uri"] == "m"


def test_retrain_tags_are_recorded_redacted(sqlite_tracking, tmp_path):
    from tokenmill.pipeline.registry import promotion

    client = mlflow.MlflowClient(sqlite_tracking)  # the session's store: names of this test's own
    run_id = client.create_run(client.create_experiment("redacted-tags")).info.run_id
    client.create_registered_model("redacted-tags")
    version = client.create_model_version("redacted-tags", str(tmp_path), run_id=run_id).version
    promotion.record(client, "redacted-tags", version, run_id, {"store": f"s3://{KEY}:{SECRET}@bucket/t.zarr"})
    tags = {**client.get_model_version("redacted-tags", version).tags, **client.get_run(run_id).data.tags}
    assert not leaks(json.dumps(tags)) and tags[promotion.TAG + "store"] == f"s3://{MASK}@bucket/t.zarr"


