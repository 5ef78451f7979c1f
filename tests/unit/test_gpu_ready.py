"""GPU-ready tokenization, checked on CPU: the actor pool decided from the cluster's resources
(not the driver's torch), threaded decoding equal to serial. (bf16 codes against fp32 codes:
tests/integration/test_bf16_codes.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tokens import make_vqvae, plant_corrupt, write_shards

from tokenmill.pipeline.tokenize.pool import plan_pool


def test_pool_follows_the_cluster_not_the_driver():
    # KubeRay: a CPU head (the driver) and two GPU workers of 8 CPUs and 2 GPUs each -> GPU
    # actors, each decoding with its node's CPUs per GPU; without the nodes, the cluster's ratio up to 4.
    nodes = [{"CPU": 2}, {"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    plan = plan_pool({"CPU": 18, "GPU": 4}, pending_shards=100, nodes=nodes)
    assert (plan.num_gpus, plan.min_size, plan.max_size, plan.initial_size) == (1, 1, 4, 4)
    assert plan.num_cpus == plan.decode_threads == 4
    assert plan_pool({"CPU": 66, "GPU": 8}, 100, nodes=[{"CPU": 2}, {"CPU": 64, "GPU": 8}]).decode_threads == 8
    assert plan_pool({"CPU": 66, "GPU": 8}, 100).decode_threads == 4
    assert plan_pool({"CPU": 66, "GPU": 8}, 100, nodes=[{"CPU": 64, "GPU": 8}], decode_threads=2).num_cpus == 2
    # Scaled to zero: the head alone, no GPU yet. `--gpus 8` asks for GPU actors that the
    # autoscaler adds nodes for; the pool starts at one and may grow to eight.
    plan = plan_pool({"CPU": 2}, pending_shards=100, gpus=8)
    assert plan.num_gpus == 1 and (plan.min_size, plan.initial_size, plan.max_size) == (1, 1, 8)
    assert plan.strategy_kwargs() == {"min_size": 1, "max_size": 8, "initial_size": 1, "max_tasks_in_flight_per_actor": 1}
    # CPU cluster: one actor per CPU, autoscaling; `--actors` raises the ceiling beyond what is up now.
    plan = plan_pool({"CPU": 6}, pending_shards=100)
    assert (plan.num_gpus, plan.min_size, plan.max_size) == (0, 1, 6) and plan.num_cpus == 1
    assert plan_pool({"CPU": 2}, pending_shards=100, actors=32).max_size == 32
    # Never more actors than work units; `--gpus 0` forces CPU on a GPU cluster.
    assert plan_pool({"CPU": 64, "GPU": 8}, pending_shards=3).max_size == 3
    assert plan_pool({"CPU": 64, "GPU": 8}, pending_shards=100, gpus=0).num_gpus == 0
    # Local instance (logical CPUs over-subscribe 2 cores): a fixed pool of one actor per core.
    plan = plan_pool({"CPU": 4}, pending_shards=100, local_cores=2)
    assert plan.strategy_kwargs() == {"size": 2, "max_tasks_in_flight_per_actor": 1}
    # --decode-threads reserves that many CPUs per actor, so fewer CPU actors fit.
    plan = plan_pool({"CPU": 8}, pending_shards=100, decode_threads=4)
    assert (plan.max_size, plan.num_cpus, plan.decode_threads) == (2, 4, 4)


def test_threaded_decoding_reads_what_the_serial_reader_reads(tmp_path: Path):
    from tokenmill.pipeline.shards.images import TransformConfig
    from tokenmill.pipeline.shards.problems import ShardError
    from tokenmill.pipeline.shards.reader import pixels_decoder, read_shard, read_shard_threaded

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
    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder

    files = resolve_model(str(make_vqvae(tmp_path / "model")))
    with pytest.raises(UserError, match="--precision"):
        TokenEncoder(files, latents=False, precision=precision)


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "--batch-size must be >= 1, got 0"), ("actors", 0, "--actors must be >= 1, got 0"),
    ("gpus", -1, "--gpus must be >= 0, got -1"), ("decode_threads", 0, "--decode-threads must be >= 1, got 0"),
    ("precision", "fp64", "--precision must be fp32, bf16 or fp16, got 'fp64'"),
    ("latents", "median", "--latents 'median'"), ("augment", "rotate", "--augment 'rotate'"),
])
def test_tokenize_options_are_checked_once_at_construction_with_the_cli_checks(field, value, message):
    import argparse

    from tokenmill.models.errors import UserError
    from tokenmill.pipeline.tokenize.options import CHECKS, TokenizeOptions, cli_type

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        TokenizeOptions(**{field: value})
    if field in CHECKS and isinstance(value, int):  # the CLI parses the same numbers with the same check
        with pytest.raises(argparse.ArgumentTypeError, match=message.split(" ", 1)[1]):
            cli_type(field)(str(value))
    options = TokenizeOptions(latents=True, storage_options={"secret": "s3cr3t"})
    assert options.extraction.latents == "mean" and "s3cr3t" not in repr(options)


def _counting_collectives():
    from tokenmill.models.quantizers.collectives import Collectives

    calls = [0]

    def count(tensor):
        calls[0] += 1

    return Collectives(all_reduce=count, broadcast=count), calls


def test_vq_step_runs_the_same_collectives_whether_or_not_a_code_is_dead():
    """The restart draws rows every step and `torch.where` keeps the live codes: no host read
    decides, so the collectives are the same with and without dead codes (ranks stay in step)."""
    import torch

    from tokenmill.models.quantizers.vector_quantizer import VectorQuantizer

    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, codebook_size=8, kmeans_iters=2, dead_code_threshold=1.0).train()
    quantizer.collectives, calls = _counting_collectives()
    z = torch.randn(256, 4)
    quantizer(z)  # k-means init + first update
    calls[0] = 0
    quantizer(z)  # every code in use: the code statistics' all-reduce and the restart's
    assert calls[0] == 2 and not (quantizer.cluster_size < 1.0).any()
    live = quantizer.embed.clone()
    quantizer.cluster_size[0] = 0.0  # code 0 dies: restarted at a row of z, the others untouched
    calls[0] = 0
    quantizer(z)
    assert calls[0] == 2 and int(quantizer.steps) == 3
    assert (quantizer.embed[0] == z).all(1).any() and not torch.equal(quantizer.embed[0], live[0])
    # The host copy of `steps` follows a state load (a resumed run draws the same restart rows).
    fresh = VectorQuantizer(4, codebook_size=8, kmeans_iters=2, dead_code_threshold=1.0)
    fresh.load_state_dict(quantizer.state_dict())
    assert fresh._host_value("steps") == 3 and fresh._host_value("initted") == 1


def test_train_step_autocasts_the_forward_only_and_scales_fp16():
    import torch

    from tokenmill.pipeline.training.optim import OptimConfig, Part
    from tokenmill.pipeline.training.step import StepRunner, own_loss

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.dtypes: list[torch.dtype] = []

        def forward(self, x):
            out = self.linear(x)
            self.dtypes.append(out.dtype)
            return type("Out", (), {"loss": out.float().pow(2).mean(), "metrics": {}})()

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = Probe()
        step = StepRunner({"model": Part("model", model, model, OptimConfig(ema_decay=0))}, precision,
                          torch.device("cpu"))
        result = step.run(own_loss, [(torch.randn(8, 4),)], 0)
        assert model.dtypes == [dtype] and model.linear.weight.dtype == torch.float32
        assert result.losses["model"].dtype == torch.float32 and result.parts["model"]["grad_norm"].shape == ()  # on the device
        assert (step.scaler is not None) == (precision == "fp16")
        assert (step.state_dict()["scaler"] is not None) == (precision == "fp16")


def test_gpu_check_enforces_thresholds_and_sets_the_failed_phases_bits():
    from tokenmill.benchmarks.gpu_check import BY_NAME, check_report, render_table

    good = {"vqgan": {"bf16_speedup": 1.8, "bf16_memory_ratio": 0.6}, "syncs": {"syncs_per_step": 4.0},
            "stream": {"stream_over_step": 3.0, "fed_over_step": 0.97, "gpu_util_pct": 95.0},
            "tokenize": {"per_gpu_over_limit": 0.85}, "prior": {"bf16_speedup": 1.5},
            "checkpoint": {"max_diff": 0.0}, "nccl": {"max_diff": "n/a: one GPU"}}
    outcomes = {"setup": {"figures": {}}, **{name: {"figures": f} for name, f in good.items()}}
    outcomes["prior"] = {"error": "prior ran past its 45 s limit", "timeout": True}
    report = _report(outcomes, dry_run=False)
    check_report(report)
    status = {row["name"]: row["status"] for row in report["checks"]}
    assert status["syncs_per_step"] == "fail" and status["nccl_identical"] == "n/a"
    assert status["prior_bf16_speedup"] == "error" and status["tokenize_over_limit"] == "pass"
    assert report["phases"]["prior"]["status"] == "timeout"
    assert report["exit_code"] == BY_NAME["syncs"].bit | BY_NAME["prior"].bit
    assert report["failed"] == ["syncs", "prior", "syncs_per_step", "prior_bf16_speedup"]
    assert "| host-device syncs per bf16 VQGAN step | 4 | <= 1 | fail |" in render_table(report)
    # A dry run enforces nothing: only a phase that did not run fails it.
    assert _report(outcomes, dry_run=True)["failed"] == ["prior", "prior_bf16_speedup"]


def test_gpu_check_report_schema_refuses_a_malformed_report():
    from tokenmill.benchmarks.gpu_check import check_report

    report = _report({"setup": {"figures": {}}}, dry_run=True)
    check_report(report)  # phases left out (--phases) are "skipped", their checks n/a: nothing failed
    assert report["failed"] == [] and {row["status"] for row in report["checks"]} == {"n/a"}
    report["checks"][0]["status"] = "great"
    del report["phases"]["nccl"]
    with pytest.raises(ValueError, match="bad status 'great'.*|phases .*"):
        check_report(report)


def test_gpu_check_phase_past_its_limit_is_stopped(tmp_path: Path):
    import time

    from tokenmill.benchmarks.gpu_check import DRY_RUN, GPU, Phase, run_phase_here

    slow = Phase("slow", 1, 1, lambda sizes, folder, inputs: time.sleep(30))
    assert slow.limit_s(dry_run=True) > slow.limit_s(dry_run=False) == 1 and DRY_RUN.device == "cpu"
    started = time.perf_counter()
    outcome = run_phase_here(slow, GPU, tmp_path, {})  # the GPU sizes: the GPU run's 1 s limit
    assert outcome == {"error": "slow ran past its 1 s limit", "timeout": True}
    assert time.perf_counter() - started < 3


def _report(outcomes: dict, dry_run: bool) -> dict:
    import time

    from tokenmill.benchmarks.gpu_check import build_report

    return build_report(outcomes, {name: 1.0 for name in outcomes}, dry_run, time.time())


def test_gpu_utilisation_reads_the_gpu_this_process_uses(monkeypatch):
    from tokenmill.benchmarks.gpu_phases import GpuUtilisation

    sampler = GpuUtilisation()
    sampler.proc, sampler.lines = object(), ["0, 90\n", "1, 10\n", "0, [N/A]\n", "0, 70\n", "garbage\n"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sampler.mean == 80.0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert sampler.mean == 10.0
    sampler.proc = None  # no nvidia-smi on this machine
    assert sampler.mean == "n/a: no nvidia-smi"


def test_resume_comparison_counts_nan_and_missing_tensors_as_infinite():
    import math

    import torch

    from tokenmill.benchmarks.gpu_phases import _max_diff, _run_diff

    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    assert _max_diff(a, {k: v.clone() for k, v in a.items()}) == 0.0
    assert _max_diff(a, {"w": torch.tensor([1.0, 2.5]), "steps": torch.tensor(3)}) == 0.5
    assert _max_diff(a, {"w": a["w"]}) == math.inf  # a tensor the resumed state lacks
    nan = {"w": torch.tensor([float("nan"), 2.0]), "steps": torch.tensor(3)}
    assert _max_diff(nan, {k: v.clone() for k, v in nan.items()}) == math.inf  # NaN never passes as equal
    assert _run_diff(([1.0, float("nan")], a), ([1.0, float("nan")], a)) == math.inf
