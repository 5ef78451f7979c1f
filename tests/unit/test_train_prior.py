"""`tokenmill train-prior` in this process: the data partition (each item once per epoch, resumed
at the batch, streaming = resident) and the refusal of a store whose tokenizer is missing or
differs, before Ray. (On S3 and as a 2-worker DDP run on Ray: tests/integration/test_train_prior_s3_and_ddp.py.)"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import CONFIGS
from helpers.engine import PRIOR_K, learnable_store, prior_store
from helpers.tokens import make_vqvae

from tokenmill.jobs.cli import main as cli_main
from tokenmill.pipeline.prior import data as prior_data
from tokenmill.pipeline.prior.config import PriorDataSection

DEBUG_CONFIG = str(CONFIGS / "debug_prior.yaml")
K = PRIOR_K  # the tokenizer's codebook; 8x8 images -> 2x2 codes


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return prior_store(tmp_path_factory.mktemp("prior-store"))


# -- the partition, no Ray ------------------------------------------------------------------------
def test_partition_reads_each_item_once_per_epoch_and_resumes_at_the_batch(store):
    dataset = prior_data.open_split(PriorDataSection(store=store), "train", 7)
    ranks = [prior_data.TrainBatches(dataset, "train", r, 2, 5, seed=3, window_chunks=4) for r in range(2)]
    assert ranks[0].partition.batches_per_epoch == 4  # 48 items, global batch 10: 8 dropped
    for epoch in range(2):
        seen = [i for rank in ranks for _, batch in rank.epoch(epoch) for i in batch["indices"].tolist()]
        assert len(seen) == len(set(seen)) == 40
    assert not np.array_equal(ranks[0].order(0), ranks[0].order(1))  # a new order (and remainder) per epoch
    full = [b["indices"].tolist() for _, b in ranks[1].epoch(1)]
    assert [b["indices"].tolist() for _, b in ranks[1].epoch(1, start=2)] == full[2:]
    batch = next(ranks[0].epoch(0))[1]  # [BOS, class, 4 codes]; class = K + 1 + label
    assert batch["tokens"].shape == (5, 6) and (batch["tokens"][:, 0] == K).all()
    assert (batch["tokens"][:, 1] == K + 1 + batch["labels"]).all()


def test_chunk_level_shuffle_is_a_permutation_that_keeps_windows_together():
    chunk_of = np.repeat(np.arange(12), 10)  # 120 items in 12 chunks of 10
    order = prior_data.epoch_order(120, seed=0, epoch=0, chunk_of=chunk_of, window_chunks=3)
    assert sorted(order.tolist()) == list(range(120))
    windows = chunk_of[order].reshape(4, 30)  # every 30 consecutive items come from 3 chunks
    assert all(len(set(w.tolist())) == 3 for w in windows)
    assert not np.array_equal(order, prior_data.epoch_order(120, 0, 1, chunk_of, 3))


def test_streaming_split_reads_the_same_tokens_as_the_resident_one(store):
    small = prior_data.open_split(PriorDataSection(store=store, cache_mb=1e-6), "train", 7)
    resident = prior_data.open_split(PriorDataSection(store=store), "train", 7)
    assert resident.resident and not small.resident
    stream = prior_data.TrainBatches(small, "train", 0, 2, 4, seed=0, window_chunks=2)
    assert stream.chunk_of is not None
    for _, batch in stream.epoch(0):
        assert np.array_equal(batch["tokens"], resident.batch(batch["indices"])["tokens"])


# -- refusals before Ray ---------------------------------------------------------------------------
def test_store_whose_tokenizer_is_missing_differs_or_misfits_is_refused_before_ray(tmp_path, capsys):
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # an earlier test's session Ray
    missing = learnable_store(str(tmp_path / "missing.zarr"), None)
    other = make_vqvae(tmp_path / "other", codebook_size=K, image_size=8)
    differs = learnable_store(str(tmp_path / "differs.zarr"), other)
    make_vqvae(other, codebook_size=K, seed=1, image_size=8)  # the same path now holds other weights
    misfit = learnable_store(str(tmp_path / "misfit.zarr"), make_vqvae(tmp_path / "16px", codebook_size=K))  # 4x4 codes
    for url, reason in ((missing, "no such folder"), (differs, "weights sha256"), (misfit, "does not fit")):
        code = cli_main(["train-prior", DEBUG_CONFIG, "--set", f"data.store={url}", "--set", f"run.root={tmp_path}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and reason in err[0] and url in err[0], err
    assert ray_was_up or "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "ray").exists()


