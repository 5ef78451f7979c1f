"""No host reads in a training step (what would be a host-device sync on a GPU), counted on the CPU
(helpers/syncs.py): every quantizer's step reads nothing; through the engine's own step (RankRun,
the task's losses, StepRunner, the Parts) a VQ, an LFQ and a VQGAN step with dead codes present
read once on logging steps (the logged values, together) and never otherwise. The dead-code
restart that makes this possible is checked here too: dead codes take rows of the batch, live ones
are untouched, and two ranks (threads) agree with one process on the concatenation.
(tests/unit/test_gpu.py counts real CUDA syncs with the same expectations.)"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import CONFIGS
from helpers.engine import grey_shards, rgb_shards, shrink
from helpers.lpips import write_random_lpips_weights
from helpers.syncs import HostReads

from tokenmill.models.quantizers import Collectives, QuantizerConfig, VectorQuantizer
from tokenmill.models.quantizers.collectives import sample_rows
from tokenmill.models.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig
from tokenmill.pipeline.training.config import load_train_config
from tokenmill.pipeline.training.context import LocalContext
from tokenmill.pipeline.training.loop import LoopSpec, RankRun
from tokenmill.pipeline.training.optim import OptimConfig, Part
from tokenmill.pipeline.training.step import StepRunner, own_loss
from tokenmill.pipeline.training.tasks.adversarial import AdversarialTask
from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster and steadier
LOGGING_SITE = "pipeline/training/loop.py"  # RankRun.step_metrics: the one read of a logging step


def restarted_codes(model: torch.nn.Module) -> int:
    """Codes the last step found dead and restarted (their EMA count is then exactly the
    threshold), over every VectorQuantizer of `model`; read outside a count."""
    return sum(int((m.cluster_size == m.dead_code_threshold).sum()) for m in model.modules()
               if isinstance(m, VectorQuantizer) and m.dead_code_threshold > 0)


QUANTIZERS = {  # 8 images of 16 px, downsample 4: 128 rows a step, so most of 512 codes are dead
    "vq-ema": dict(kind="vq"), "vq-straight-through": dict(kind="vq", ema=False),
    "vq-rotation-cosine": dict(kind="vq", rotation_trick=True, cosine=True, codebook_dim=4),
    "rvq": dict(kind="rvq", num_stages=2), "multiscale": dict(kind="multiscale", scales=(1, 2, 4)),
    "fsq": dict(kind="fsq", levels=(4, 4)), "lfq": dict(kind="lfq", bits=6), "bsq": dict(kind="bsq", bits=6),
    "simvq": dict(kind="simvq"),
}


@pytest.mark.parametrize("model_kind, quantizer, precision", [
    *[("vqvae", name, "fp32") for name in QUANTIZERS], ("vqvae", "vq-ema", "fp16"), ("vqvae2", "vq-ema", "bf16")])
def test_every_quantizers_training_step_reads_nothing(model_kind, quantizer, precision):
    torch.manual_seed(0)
    options = dict(in_channels=3, image_size=16, hidden=8, res_blocks=1, latent_dim=8,
                   quantizer=QuantizerConfig(codebook_size=512, kmeans_iters=2, **QUANTIZERS[quantizer]))
    model = VQVAE(VQVAEConfig(downsample=4, **options)) if model_kind == "vqvae" else VQVAE2(VQVAE2Config(**options))
    step = StepRunner({"model": Part("model", model, model, OptimConfig(ema_decay=0.9))}, precision,
                      torch.device("cpu"))
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    step.run(own_loss, [(x,)], 0)  # k-means / LFQ init: once per run
    codebook = quantizer.startswith(("vq", "rvq", "multiscale"))
    for i in (1, 2):
        with HostReads() as reads:
            result = step.run(own_loss, [(x,)], i)
        assert not reads.sites, reads.report()
        assert not codebook or restarted_codes(model) > 0  # the step had dead codes to restart
    assert torch.isfinite(result.losses["model"]) and "usage" in result.metrics


@pytest.fixture(scope="module")
def grey(tmp_path_factory) -> str:
    return grey_shards(tmp_path_factory.mktemp("sync-grey"))


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> str:
    return rgb_shards(tmp_path_factory.mktemp("sync-rgb"))


def tokenizer_task(shards: str, root, quantizer: str) -> TokenizerTask:
    q = {"vq": ["model.quantizer.codebook_size=512"], "lfq": ["model.quantizer.kind=lfq", "model.quantizer.bits=6"]}
    return TokenizerTask(load_train_config(CONFIGS / "debug_vqvae.yaml", [
        *shrink(steps=6, batch_size=4), "train.log_every=2", f"data.shards={shards}", f"run.root={root}",
        *q[quantizer], "optim.skip_grad_norm=1e6"]))


def vqgan_task(shards: str, root, lpips) -> AdversarialTask:
    """The GAN from the first step, with taming's adaptive weight, LeCAM and LPIPS (random weights)."""
    vgg, lin = lpips
    return AdversarialTask(load_train_config(CONFIGS / "debug_vqgan.yaml", [
        *shrink(steps=6, batch_size=4), "train.log_every=2", f"data.shards={shards}", f"run.root={root}",
        "model.quantizer.codebook_size=512", "loss.disc_start=0", "loss.adaptive_weight=true",
        "loss.perceptual_weight=0.1", f"loss.perceptual.vgg_path={vgg}", f"loss.perceptual.lin_path={lin}",
        "loss.perceptual.verify_sha256=false"]))


def counted_engine_steps(task, root) -> tuple[RankRun, list[tuple[bool, HostReads]]]:
    """Steps 2-5 of `task` through the engine's own RankRun.step (step 1 initialises the
    codebook), each counted: [(logging step?, its reads)]."""
    task.prepare("")
    context = LocalContext(root, task.inputs(in_process=True).datasets)
    torch.manual_seed(0)
    run = RankRun.start(task, context, LoopSpec())
    batches = (batch for _, batch in task.batches(0, 0))
    run.step([next(batches)])
    counted = []
    for _ in range(4):
        micro = [next(batches)]
        with HostReads() as reads:
            run.step(micro)
        assert task.config.model.quantizer.kind != "vq" or restarted_codes(run.main.module) > 0
        counted.append((run.state.step % run.loop.log_every == 0, reads))
    return run, counted


@pytest.mark.parametrize("kind", ["vq", "lfq", "vqgan"])
def test_an_engine_step_reads_once_on_logging_steps_and_never_otherwise(kind, grey, rgb, tmp_path_factory, tmp_path,
                                                                        capfd):
    if kind == "vqgan":
        task = vqgan_task(rgb, tmp_path, write_random_lpips_weights(tmp_path_factory.mktemp("sync-lpips")))
    else:
        task = tokenizer_task(grey, tmp_path, kind)
    run, counted = counted_engine_steps(task, tmp_path)
    assert [logging for logging, _ in counted] == [True, False, True, False]
    for logging, reads in counted:
        assert len(reads.sites) == (1 if logging else 0), reads.report()
        assert all(LOGGING_SITE in site and "step_metrics" in site for site in reads.sites), reads.report()
    assert "step 4/6  loss" in capfd.readouterr().out  # the logging steps did log what they read
    for part in run.parts.values():  # every part (the VQGAN's discriminator too) took its updates
        assert (part.steps, part.updates, part.skipped) == (5, 5, 0), part.name


def test_restart_gives_dead_codes_distinct_batch_rows_and_leaves_live_codes_alone():
    vq = VectorQuantizer(3, codebook_size=16, kmeans_init=False, dead_code_threshold=1.0).train()
    before = {name: getattr(vq, name).clone() for name in ("embed", "embed_sum", "cluster_size")}
    dead = torch.arange(16) % 3 == 0  # codes 0, 3, ..., 15
    vq.cluster_size.copy_(torch.where(dead, 0.5, 2.0))
    z = torch.randn(40, 3, generator=torch.Generator().manual_seed(2))  # (N, d)
    with HostReads() as reads:
        vq._restart_dead_codes(z)
    assert not reads.sites, reads.report()
    assert torch.equal(vq.embed[~dead], before["embed"][~dead])
    assert torch.equal(vq.embed_sum[~dead], before["embed_sum"][~dead])
    assert (vq.cluster_size[~dead] == 2.0).all() and (vq.cluster_size[dead] == 1.0).all()
    matches = (vq.embed[dead][:, None] == z[None]).all(-1)  # (dead, N)
    assert (matches.sum(1) == 1).all(), "every dead code is one row of the batch"
    assert len(set(matches.long().argmax(1).tolist())) == int(dead.sum()), "distinct rows"
    torch.testing.assert_close(vq.embed_sum[dead], vq.embed[dead])  # sum = code × threshold (1)


def threaded_ranks(rows: list[torch.Tensor], m: int, seed: int) -> list[torch.Tensor]:
    """`sample_rows` on len(rows) ranks, each a thread with its own rows; all_reduce is a real sum
    over the threads (a barrier), so each rank sees only what the collectives give it."""
    world, barrier, slots = len(rows), threading.Barrier(len(rows)), {}
    out: list[torch.Tensor | None] = [None] * world

    def rank(r: int) -> None:
        def all_reduce(t: torch.Tensor) -> None:
            slots[r] = t.clone()
            barrier.wait()
            total = sum(slots[i] for i in range(world))
            barrier.wait()
            t.copy_(total)

        collectives = Collectives(all_reduce=all_reduce, rank=r, world_size=world)
        out[r] = sample_rows(rows[r], m, torch.Generator().manual_seed(seed), collectives)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_ranks_draw_what_one_process_draws_and_agree_when_their_counts_differ():
    rows = torch.randn(30, 2, generator=torch.Generator().manual_seed(3))
    single = sample_rows(rows, 12, torch.Generator().manual_seed(9), Collectives())
    ranks = threaded_ranks([rows[:15], rows[15:]], 12, seed=9)  # equal counts: one process's distinct draw
    assert all(torch.equal(r, single) for r in ranks)
    assert len({tuple(r) for r in single.tolist()}) == 12
    uneven = threaded_ranks([rows[:20], rows[20:]], 12, seed=9)  # unequal: draws with replacement, agreed
    assert torch.equal(uneven[0], uneven[1])
    assert ((uneven[0][:, None] == rows[None]).all(-1).sum(1) == 1).all()
