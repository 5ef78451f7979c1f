"""GPU-ready tokenization, checked on CPU: the actor pool decided from the cluster's resources
(not the driver's torch), bf16 codes against fp32 codes, threaded decoding equal to serial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenize_helpers import make_vqvae, plant_corrupt, write_shards

from pipeline.tokenize_pool import plan_pool


def test_pool_follows_the_cluster_not_the_driver():
    # KubeRay: a CPU head (the driver) and two GPU workers of 8 CPUs each -> GPU actors, 4 decode threads.
    plan = plan_pool({"CPU": 16, "GPU": 2}, pending_shards=100)
    assert (plan.num_gpus, plan.min_size, plan.max_size, plan.initial_size) == (1, 1, 2, 2)
    assert plan.num_cpus == plan.decode_threads == 4
    # Scaled to zero: the head alone, no GPU yet. `--gpus 8` asks for GPU actors that the
    # autoscaler adds nodes for; the pool starts at one and may grow to eight.
    plan = plan_pool({"CPU": 2}, pending_shards=100, gpus=8)
    assert plan.num_gpus == 1 and (plan.min_size, plan.initial_size, plan.max_size) == (1, 1, 8)
    assert plan.strategy_kwargs() == {"min_size": 1, "max_size": 8, "initial_size": 1}
    # CPU cluster: one actor per CPU, autoscaling; `--actors` raises the ceiling beyond what is up now.
    plan = plan_pool({"CPU": 6}, pending_shards=100)
    assert (plan.num_gpus, plan.min_size, plan.max_size) == (0, 1, 6) and plan.num_cpus == 1
    assert plan_pool({"CPU": 2}, pending_shards=100, actors=32).max_size == 32
    # Never more actors than work units; `--gpus 0` forces CPU on a GPU cluster.
    assert plan_pool({"CPU": 64, "GPU": 8}, pending_shards=3).max_size == 3
    assert plan_pool({"CPU": 64, "GPU": 8}, pending_shards=100, gpus=0).num_gpus == 0
    # Local instance (logical CPUs over-subscribe 2 cores): a fixed pool of one actor per core.
    plan = plan_pool({"CPU": 4}, pending_shards=100, local_cores=2)
    assert plan.strategy_kwargs() == {"size": 2}
    # --decode-threads reserves that many CPUs per actor, so fewer CPU actors fit.
    plan = plan_pool({"CPU": 8}, pending_shards=100, decode_threads=4)
    assert (plan.max_size, plan.num_cpus, plan.decode_threads) == (2, 4, 4)


def test_bf16_codes_agree_with_fp32(tmp_path: Path):
    """The debug VQ-VAE preset trained briefly (100 steps, ~1 s) on MNIST at 16 px: its codes
    under bf16 autocast against fp32 on 1,000 digits (16,000 tokens)."""
    import torch
    import torch.nn.functional as F

    from models.serialization import build_model, save_model
    from models.training import OptimConfig, TrainStep
    from pipeline.registry.model_ref import resolve_model
    from pipeline.shards.sources import load_builtin
    from pipeline.tokens.encoder import TokenEncoder
    from pipeline.training.config import load_train_config

    digits = load_builtin("builtin:mnist5k").images  # (5000, 32, 32, 1) uint8
    x = F.interpolate(torch.from_numpy(digits).permute(0, 3, 1, 2).float() / 255, size=16, mode="area")
    torch.manual_seed(0)
    model = build_model(load_train_config("configs/debug_vqvae.yaml").model)
    step = TrainStep(model, OptimConfig(lr=3e-3, ema_decay=0))
    for _ in range(100):
        step.step(x[torch.randint(0, 4000, (64,))])
    files = resolve_model(str(save_model(model.eval(), tmp_path / "model")))
    batch = (x[4000:] * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()  # (1000, 16, 16, 1)
    labels = np.zeros(len(batch), dtype=np.int64)
    fp32 = TokenEncoder(files, latents=False).encode(batch, labels)["codes"]
    bf16 = TokenEncoder(files, latents=False, precision="bf16").encode(batch, labels)["codes"]
    agreement = float((fp32 == bf16).mean())
    assert fp32.shape == (1000, 4, 4) and len(np.unique(fp32)) > 16  # codes vary: the check means something
    assert agreement >= 0.99, agreement


def test_threaded_decoding_reads_what_the_serial_reader_reads(tmp_path: Path):
    from pipeline.shards.images import TransformConfig
    from pipeline.shards.problems import ShardError
    from pipeline.shards.reader import pixels_decoder, read_shard, read_shard_threaded

    shards = write_shards(str(tmp_path / "shards"), tmp_path / "source", n=30)
    tar = sorted(Path(shards).glob("train-*.tar"))[0]
    plant_corrupt(tar)
    decode = pixels_decoder(TransformConfig(size=16, channels=1))
    serial = list(read_shard(str(tar), decode))
    threaded = list(read_shard_threaded(str(tar), decode, threads=3, window=4))

    def view(item):
        if isinstance(item, ShardError):
            return ("error", item.key, item.reason)
        return ("sample", item.key, item.label, item.pixels.tobytes())

    assert [view(i) for i in threaded] == [view(i) for i in serial]
    assert sum(isinstance(i, ShardError) for i in serial) == 2  # the planted corrupt image + image-less sample


@pytest.mark.parametrize("precision", ["fp64"])
def test_unknown_precision_is_a_user_error(tmp_path: Path, precision: str):
    from models.errors import UserError
    from pipeline.registry.model_ref import resolve_model
    from pipeline.tokens.encoder import TokenEncoder

    files = resolve_model(str(make_vqvae(tmp_path / "model")))
    with pytest.raises(UserError, match="--precision"):
        TokenEncoder(files, latents=False, precision=precision)
