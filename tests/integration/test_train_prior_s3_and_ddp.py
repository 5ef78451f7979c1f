"""`tokenmill train-prior` against services: its store read from the S3 server gives the same
batches resident and streaming, and a 2-worker DDP run on local Ray learns, resumes at the right
batch and reads every training item exactly once per epoch across ranks; the MaskGIT and VAR
kinds each train once on two ranks too. (The partition and the refusals before Ray:
tests/unit/test_train_prior.py; resume of each kind: tests/unit/test_masked_prior.py, test_var_prior.py.)"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers import CONFIGS
from helpers.engine import PRIOR_K, multiscale_prior_store, prior_store

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.prior import data as prior_data
from tokenmill.pipeline.prior.config import PriorDataSection

DEBUG_CONFIG = str(CONFIGS / "debug_prior.yaml")
K = PRIOR_K  # the tokenizer's codebook; 8x8 images -> 2x2 codes


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return prior_store(tmp_path_factory.mktemp("prior-store"))


def test_a_store_on_s3_reads_the_same_batches_resident_and_streaming(store, s3_server, s3_bucket, tmp_path):
    """`data.store` may be any fsspec URL: the same store on the S3 server gives the same batches,
    read ahead by a thread, streamed chunks kept in the node's shared folder."""
    import s3fs

    options = s3_server["storage_options"]
    s3fs.S3FileSystem(**options).put(store, f"{s3_bucket}/tokens.zarr", recursive=True)
    local = prior_data.open_split(PriorDataSection(store=store), "train", 7)
    for cache_mb in (1024, 1e-6):  # resident, then chunk-cached reads over S3
        remote = prior_data.open_split(PriorDataSection(
            store=f"{s3_bucket}/tokens.zarr", storage_options=options, cache_mb=cache_mb,
            node_cache_dir=str(tmp_path / "node")), "train", 7)
        assert remote.resident == (cache_mb > 1)
        stream = prior_data.TrainBatches(remote, "train", 1, 2, 4, seed=0, window_chunks=2, prefetch_batches=2)
        read = []
        for _, batch in stream.epoch(0):
            assert np.array_equal(batch["tokens"], local.batch(batch["indices"])["tokens"])
            read.append(batch["indices"])
    touched = np.unique(stream.chunk_of[np.concatenate(read)])  # one file per chunk the streamed reads needed
    assert len(list((tmp_path / "node").glob("*.npy"))) == len(touched) > 0


# -- 2-worker DDP on local Ray ---------------------------------------------------------------------
def train(root: Path, store: str, *overrides: str, config: str = DEBUG_CONFIG) -> dict:
    out = root / f"summary-{len(list(root.glob('summary-*')))}.json"
    sets = [f"data.store={store}", f"run.root={root}", f"data.item_log={root / 'items'}", *overrides]
    assert cli_main(["train-prior", config, *[a for o in sets for a in ("--set", o)], "--json", str(out)]) == 0
    return json.loads(out.read_text())


def items_by_rank(root: Path) -> dict[int, list[int]]:
    """rank -> the items it read (every epoch) in the item log under `root`."""
    return {rank: [int(i) for line in (root / "items" / f"rank{rank}.txt").read_text().splitlines()
                   for i in line.split()[2:]] for rank in (0, 1)}


def test_ddp_prior_learns_resumes_and_reads_each_item_once_per_epoch(ray_local, store, tmp_path):
    first = train(tmp_path, store, "train.steps=4")  # stops mid-epoch 0 (6 batches of 2 x 4)
    second = train(tmp_path, store, "train.steps=9")  # resumes at batch 4 of epoch 0
    metrics = second["final_metrics"]
    assert first["final_metrics"]["step"] == 4 and metrics["resumed_from_step"] == 4 and metrics["step"] == 9
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert isinstance(metrics["val/bits_per_token"], float)  # a rate, not masked as a secret by --json

    seen: dict[int, list[int]] = {}  # epoch -> items read by either rank, across both runs
    for rank in (0, 1):
        for line in (tmp_path / "items" / f"rank{rank}.txt").read_text().splitlines():
            epoch, _, *items = map(int, line.split())
            seen.setdefault(epoch, []).extend(items)
    assert len(seen[0]) == len(set(seen[0])) == 48  # the whole epoch, resumed mid-way, no repeats
    assert len(seen[1]) == len(set(seen[1])) == 3 * 8

    client = mlflow.MlflowClient(second["mlflow_tracking_uri"])
    run_id = second["mlflow_run_id"]
    history = sorted(client.get_metric_history(run_id, "train/bits_per_token"), key=lambda m: m.step)
    assert len(history) == 9 and history[-1].value < history[0].value - 0.5, [m.value for m in history]
    val = sorted(client.get_metric_history(run_id, "val/bits_per_token"), key=lambda m: m.step)
    assert [m.step for m in val] == [3, 4, 6, 9] and val[-1].value < val[0].value
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == [f"samples/step_{s:07d}.png" for s in (4, 6, 9)]  # every 6 steps and at each run's end

    from tokenmill.pipeline.prior.lineage import read_prior_lineage

    lineage = read_prior_lineage(second["model_dir"])
    tokenizer = Path(store).parent / "tokenizer"
    assert lineage["store_url"] == store and lineage["tokenizer_uri"] == str(tokenizer)
    assert lineage["tokenizer_sha256"] == hashlib.sha256((tokenizer / "model.safetensors").read_bytes()).hexdigest()
    assert lineage["vocab"]["bos"] == K and lineage["grid"] == [[2, 2]]
    assert client.get_model_version(second["registered_model"], second["model_version"]).run_id == run_id



@pytest.mark.parametrize("kind", ["maskgit", "var"])
def test_ddp_trains_a_maskgit_and_a_var_prior_on_two_ranks(ray_local, store, kind, tmp_path):
    """The other two kinds under the same 2-worker DDP (no unused parameter stalls DDP's reducer):
    each rank reads its own half of every global batch, validation learns below a uniform guess,
    and the export is a prior of that kind with its lineage (MaskGIT's MASK token, VAR's scales)."""
    from tokenmill.models import load_model
    from tokenmill.pipeline.prior.lineage import read_prior_lineage

    data = store if kind == "maskgit" else multiscale_prior_store(tmp_path / "scales")
    summary = train(tmp_path, data, "train.steps=3", "train.sample_every=3", config=str(CONFIGS / f"debug_{kind}.yaml"))
    metrics = summary["final_metrics"]
    assert metrics["step"] == 3 and 0 < metrics["val/bits_per_token"] < np.log2(K), metrics  # uniform: 6 bits
    ranks = items_by_rank(tmp_path)
    assert len(ranks[0]) == len(ranks[1]) == 3 * 4 and not set(ranks[0]) & set(ranks[1])  # 3 steps of 4 per rank

    prior = load_model(summary["model_dir"])
    lineage = read_prior_lineage(summary["model_dir"])
    assert prior.config.kind == kind and lineage["grid"] == prior.config.grid
    assert (lineage["vocab"]["mask"] == K if kind == "maskgit" else lineage["grid"] == [[2, 2], [4, 4]]), lineage
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    assert [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "samples")] == ["samples/step_0000003.png"]
