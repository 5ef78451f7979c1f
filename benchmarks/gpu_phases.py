"""The measurements of the GPU check (`benchmarks.gpu_check`), one function per phase.

Each phase takes a `Sizes` (the GPU's or the CPU dry run's) and a work folder and returns a
flat dict of figures (numbers, or a string "n/a: why"). The pieces measured are tokenmill's
own: the training engine's `StepRunner` over the adversarial (VQGAN) task's parts built by the
loop's `build_parts`, the Ray Data training stream (`open_stream`), `tokenize_dataset` and its
`TokenEncoder`, the prior's step, and the train state's save and load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tokenmill.pipeline.training.optim import OptimConfig

NA_CPU = "n/a: CPU dry run"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything a phase's cost depends on (`gpu_check.GPU` and `gpu_check.DRY_RUN`)."""

    device: str  # "cuda" or "cpu"
    px: int  # image side
    images: int  # JPEGs in the shards (variants of `photos` drawn pictures)
    photos: int
    per_shard: int
    batch: int  # the VQGAN step's batch
    warmup: int  # untimed steps (cuDNN autotuning, k-means init, allocator)
    steps: int  # timed steps per precision
    vqgan: dict  # VQGAN model config (without image_size)
    discriminator: dict
    tokenize_batch: int
    limit_images: int  # images the encoder-limit loop encodes
    prior: dict  # PriorConfig fields
    prior_batch: int
    resume_steps: int  # steps after the checkpoint, uninterrupted vs resumed
    fed_batches: int = 0  # the fed pass stops after this many batches (0: the whole pass)


# -- the VQGAN step -------------------------------------------------------------------------------------

def vqgan_config(sizes: Sizes, steps: int = 1000) -> Any:
    """The train config of the check's VQGAN: the discriminator on from step 0 (its step is the
    dearer one), adaptive weight on, no LPIPS (its weights are not on a fresh node)."""
    from tokenmill.pipeline.training.config import TrainJobConfig

    return TrainJobConfig.model_validate({
        "model": {"kind": "vqgan", "in_channels": 3, "image_size": sizes.px, **sizes.vqgan},
        "loss": {"perceptual_weight": 0.0, "adversarial_weight": 0.5, "disc_start": 0, "lecam_weight": 0.001,
                 "discriminator": sizes.discriminator},
        "optim": OptimConfig(lr=1e-4, betas=(0.5, 0.9), grad_clip=1.0, ema_decay=0.999),
        "train": {"steps": steps, "batch_size": sizes.batch},
    })


def vqgan_step(sizes: Sizes, precision: str, folder: Path, context: Any = None, seed: int = 0):
    """(task, parts, StepRunner) of the adversarial task on `context` (default: this process on
    `sizes.device`), built as the training loop builds them."""
    from tokenmill.pipeline.training.context import LocalContext
    from tokenmill.pipeline.training.loop import build_parts, seed_everything
    from tokenmill.pipeline.training.precision import configure_device_math
    from tokenmill.pipeline.training.step import StepRunner
    from tokenmill.pipeline.training.tasks.adversarial import AdversarialTask

    context = context or LocalContext(folder, device=sizes.device)
    seed_everything(seed)
    configure_device_math(context.device)
    task = AdversarialTask(vqgan_config(sizes))
    task.setup(context)
    parts = build_parts(task, context, None)
    return task, parts, StepRunner(parts, precision, context.device)


def image_batches(sizes: Sizes, count: int, device: Any, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` stream-like batches on `device`: uint8 (B, H, W, C) images and int64 labels."""
    generator = torch.Generator().manual_seed(seed)
    shape = (sizes.batch, sizes.px, sizes.px, 3)
    return [{"image": torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(device),
             "label": torch.zeros(sizes.batch, dtype=torch.int64, device=device)} for _ in range(count)]


def sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(runner: Any, losses: Callable, batches: Iterator[Any], steps: int, first: int = 0) -> float:
    """Seconds per step over `steps` steps (the device drained before and after)."""
    sync(runner.device)
    started = time.perf_counter()
    for step in range(first, first + steps):
        runner.run(losses, [next(batches)], step)
    sync(runner.device)
    return (time.perf_counter() - started) / steps


def _cycle(items: list[Any]) -> Iterator[Any]:
    while True:
        yield from items


def vqgan_precisions(sizes: Sizes, folder: Path) -> dict[str, Any]:
    """fp32 vs bf16 step time and peak memory of the VQGAN step, one after the other here."""
    out: dict[str, Any] = {"px": sizes.px, "batch": sizes.batch}
    cuda = sizes.device == "cuda"
    for precision in ("fp32", "bf16"):
        task, parts, runner = vqgan_step(sizes, precision, folder)
        batches = _cycle(image_batches(sizes, 2, runner.device))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timed_steps(runner, task.losses, batches, sizes.warmup)  # cuDNN autotuning, k-means init
        seconds = timed_steps(runner, task.losses, batches, sizes.steps, sizes.warmup)
        out[f"{precision}_step_ms"] = 1000 * seconds
        out[f"{precision}_img_s"] = sizes.batch / seconds
        out[f"{precision}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else NA_CPU
        del task, parts, runner, batches
        gc.collect()  # the next precision's peak must not include this one's tensors
    out["bf16_speedup"] = out["fp32_step_ms"] / out["bf16_step_ms"]
    out["bf16_memory_ratio"] = out["bf16_peak_gib"] / out["fp32_peak_gib"] if cuda else NA_CPU
    return out


# -- host-device syncs ----------------------------------------------------------------------------------

def count_syncs(fn: Callable[[], Any]) -> int:
    """Host-device synchronisations `fn` makes on CUDA: the warnings of CUDA's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def host_syncs(sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Syncs per bf16 VQGAN step after warm-up (no logging step: the logged loss read is not counted)."""
    task, _, runner = vqgan_step(sizes, "bf16", folder)
    batches = _cycle(image_batches(sizes, 2, runner.device))
    timed_steps(runner, task.losses, batches, sizes.warmup)
    steps = 3
    if sizes.device != "cuda":
        timed_steps(runner, task.losses, batches, 1, sizes.warmup)  # the same code runs; nothing to count
        return {"syncs_per_step": NA_CPU, "steps_counted": 0}
    total = count_syncs(lambda: timed_steps_nosync(runner, task.losses, batches, steps, sizes.warmup))
    return {"syncs_per_step": total / steps, "steps_counted": steps}


def timed_steps_nosync(runner: Any, losses: Callable, batches: Iterator[Any], steps: int, first: int) -> None:
    """`steps` steps with no synchronisation of ours (what `count_syncs` must not count)."""
    for step in range(first, first + steps):
        runner.run(losses, [next(batches)], step)


# -- the training stream vs the step -------------------------------------------------------------------

class GpuUtilisation:
    """Samples `nvidia-smi` every 200 ms while open; `mean` is the busy percentage of the GPU this
    process uses (a string "n/a: ..." without nvidia-smi)."""

    def __enter__(self) -> "GpuUtilisation":
        self.lines: list[str] = []
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return self
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(timeout=5)

    @property
    def mean(self) -> float | str:
        if self.proc is None:
            return "n/a: no nvidia-smi"
        index = _visible_index()
        busy = [u.strip() for i, u in (line.split(",") for line in self.lines if line.count(",") == 1)
                if i.strip() == index]
        busy = [float(u) for u in busy if u.replace(".", "", 1).isdigit()]  # MIG slices report "[N/A]"
        return sum(busy) / len(busy) if busy else "n/a: no utilisation samples"


def _visible_index() -> str:
    """nvidia-smi's index of CUDA device 0 (the first of CUDA_VISIBLE_DEVICES when it names indices)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return first if first.isdigit() else "0"


def stream_vs_step(sizes: Sizes, folder: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """img/s of the Ray Data training stream as a rank reads it (torch batches on the device),
    of the bf16 VQGAN step alone on device-resident batches, and of the step fed by the stream
    (with the GPU's utilisation sampled meanwhile)."""
    from tokenmill.benchmarks.harness import PeakRSS
    from tokenmill.pipeline.shards.manifest import shard_urls

    urls = shard_urls(inputs["shards"])
    with _ray(), PeakRSS() as peak:  # host memory of this process and its Ray workers (the object store's blocks)
        stream_img_s, first_batch_s = _stream_rate(sizes, urls, epoch=0, consume=None)
        task, _, runner = vqgan_step(sizes, "bf16", folder)
        resident = _cycle(image_batches(sizes, 2, runner.device))
        timed_steps(runner, task.losses, resident, sizes.warmup)
        step_img_s = sizes.batch / timed_steps(runner, task.losses, resident, sizes.steps, sizes.warmup)
        counter = iter(range(sizes.warmup + sizes.steps, 10**9))
        with GpuUtilisation() as utilisation:
            fed_img_s, _ = _stream_rate(sizes, urls, epoch=1, limit=sizes.fed_batches,
                                        consume=lambda batch: runner.run(task.losses, [batch], next(counter)))
    return {"images": inputs["images"], "shards": len(urls), "stream_img_s": stream_img_s,
            "stream_first_batch_s": first_batch_s, "step_img_s": step_img_s, "fed_img_s": fed_img_s,
            "stream_over_step": stream_img_s / step_img_s, "fed_over_step": fed_img_s / step_img_s,
            "gpu_util_pct": utilisation.mean, "host_peak_rss_gib": peak.total_mb / 1024}


@contextlib.contextmanager
def _ray() -> Iterator[None]:
    """Ray up for the phase (this process's own instance unless one is up already, as in tests)."""
    import ray

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray

    mine = not ray.is_initialized()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray()
    try:
        yield
    finally:
        if mine:
            ray.shutdown()


def _stream_rate(sizes: Sizes, urls: list[str], epoch: int, consume: Callable | None,
                 limit: int = 0) -> tuple[float, float]:
    """(img/s from the first batch to the last, seconds to the first batch) of one pass of the
    training stream (its first `limit` batches when > 0), read as `TokenizerTask.batches` reads
    it; `consume(batch)` per batch."""
    from tokenmill.pipeline.shards.images import TransformConfig
    from tokenmill.pipeline.shards.stream import StreamConfig, open_stream
    from tokenmill.pipeline.training.tasks.image_data import TRAIN_COLUMNS

    transform = TransformConfig(size=sizes.px, channels=3, resize="random-crop", hflip=True)
    config = StreamConfig(transform=transform, seed=0)  # the train split's config (image_data.stream_configs)
    dataset = open_stream(urls, config, epoch=epoch).dataset.select_columns(TRAIN_COLUMNS)
    started = time.perf_counter()
    first, count = None, 0
    for batch in dataset.iter_torch_batches(batch_size=sizes.batch, drop_last=True, device=sizes.device,
                                            local_shuffle_buffer_size=config.shuffle_buffer, local_shuffle_seed=epoch):
        if first is None:  # the pass's start-up (planning, first read tasks) is reported apart
            first = time.perf_counter()
        else:
            count += len(batch["image"])
        if consume is not None:
            consume(batch)
        if count == (limit - 1) * sizes.batch:
            break
    sync(sizes.device)
    if first is None or count == 0:
        raise RuntimeError(f"the stream gave fewer than 2 batches of {sizes.batch}")
    return count / (time.perf_counter() - first), first - started


# -- tokenize vs the encoder's limit --------------------------------------------------------------------

def tokenize_vs_limit(sizes: Sizes, folder: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """`tokenize_dataset` (bf16, every GPU) per GPU after start-up, over the bf16 encoder's limit
    on one GPU with the pipeline's own input: uint8 (B, H, W, C) on the device, permuted to a
    channels_last float view as `TokenEncoder.encode` does, the same model in channels_last."""
    from tokenmill.benchmarks.harness import PeakRSS
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions

    cuda = sizes.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    options = TokenizeOptions(batch_size=sizes.tokenize_batch, overwrite=True, gpus=gpus, precision="bf16",
                              actors=None if cuda else 1)  # decode threads: the pool's own choice
    with _ray(), PeakRSS() as peak:
        summary = tokenize_dataset(inputs["model"], inputs["shards"], str(folder / "tokens.zarr"), options)
    steady_img_s = summary.encoded_now / max(summary.seconds - summary.startup_s, 1e-9)
    per_gpu = steady_img_s / max(gpus, 1)
    limit = encoder_limit(sizes, inputs["model"])
    return {"images": summary.encoded_now, "gpus": gpus, "seconds": summary.seconds, "startup_s": summary.startup_s,
            "img_s": summary.img_per_s, "steady_img_s": steady_img_s, "per_gpu_img_s": per_gpu,
            "limit_img_s": limit, "per_gpu_over_limit": per_gpu / limit, "host_peak_rss_gib": peak.total_mb / 1024,
            "actor_peak_rss_gib": max(peak.actors_mb().values(), default=0.0) / 1024}


def encoder_limit(sizes: Sizes, model_dir: str) -> float:
    """img/s of the bf16 encoder alone (`TokenEncoder._forward`: autocast, fp32 code search) on
    device-resident uint8 batches: what one GPU could do if decoding and copies cost nothing."""
    from tokenmill.pipeline.registry.model_ref import resolve_model
    from tokenmill.pipeline.tokens.encoder import TokenEncoder

    encoder = TokenEncoder(resolve_model(model_dir), latents=False, device=sizes.device, precision="bf16")
    generator = torch.Generator().manual_seed(0)
    shape = (sizes.tokenize_batch, sizes.px, sizes.px, 3)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(sizes.device)
    labels = torch.zeros(sizes.tokenize_batch, dtype=torch.int64, device=sizes.device)

    def encode() -> None:
        encoder._forward(images.permute(0, 3, 1, 2).float().div_(255.0), labels)  # NHWC memory, as encode()

    for _ in range(2):  # cuDNN autotuning
        encode()
    batches = max(1, sizes.limit_images // sizes.tokenize_batch)
    sync(sizes.device)
    started = time.perf_counter()
    for _ in range(batches):
        encode()
    sync(sizes.device)
    return batches * sizes.tokenize_batch / (time.perf_counter() - started)


# -- the prior ------------------------------------------------------------------------------------------

def prior_precisions(sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Training tokens/s of the prior's step (the engine's StepRunner, `next_token_loss`) in fp32
    (TF32 matmuls, as the engine runs fp32 on CUDA) and bf16."""
    from tokenmill.models.prior import PriorConfig, TransformerPrior
    from tokenmill.pipeline.training.optim import Part
    from tokenmill.pipeline.training.precision import configure_device_math
    from tokenmill.pipeline.training.step import StepRunner

    device = torch.device(sizes.device)
    configure_device_math(device)
    config = PriorConfig(**sizes.prior)
    out: dict[str, Any] = {"seq_len": config.seq_len, "batch": sizes.prior_batch}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        prior = TransformerPrior(config).to(device)
        optim = OptimConfig(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, grad_clip=1.0, ema_decay=0.0)
        runner = StepRunner({"model": Part("model", prior, prior, optim)}, precision, device)
        batches = _cycle([prior_tokens(config, sizes.prior_batch, device, seed) for seed in range(2)])
        timed_steps(runner, _prior_losses, batches, sizes.warmup)
        seconds = timed_steps(runner, _prior_losses, batches, sizes.steps, sizes.warmup)
        out[f"{precision}_tokens_s"] = sizes.prior_batch * config.seq_len / seconds
        del prior, runner
    out["bf16_speedup"] = out["bf16_tokens_s"] / out["fp32_tokens_s"]
    return out


def _prior_losses(tokens: torch.Tensor, step: int, parts: Any) -> Iterator[Any]:
    """A generator, as a task's `losses`: its body runs under the step's autocast (a loss computed
    before the step's `next()` would run in fp32 whatever the precision)."""
    from tokenmill.pipeline.training.tasks.prior import next_token_loss

    yield next_token_loss(tokens, parts)


def prior_tokens(config: Any, batch: int, device: torch.device, seed: int) -> torch.Tensor:
    """(batch, prefix + N) rows as the store gives them: BOS, a class token, random codes."""
    generator = torch.Generator().manual_seed(seed)
    k = config.codebook_size
    labels = torch.randint(0, max(config.num_classes, 1), (batch, 1), generator=generator)
    prefix = [torch.full((batch, 1), k)] + ([k + 1 + labels] if config.num_classes else [])
    codes = torch.randint(0, k, (batch, config.seq_len), generator=generator)
    return torch.cat(prefix + [codes], dim=1).to(device)


# -- checkpoint save and resume -------------------------------------------------------------------------

def checkpoint_resume(sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Two bf16 VQGAN steps, the train state saved as the loop saves it, `resume_steps` more
    steps; then models built from other seeds load the state and take the same steps, twice.
    `restored_max_diff`: every tensor of the loaded state vs the saved one (must be 0);
    `continued_max_diff`: the resumed steps' losses and weights vs the uninterrupted ones;
    `floor_max_diff`: the two resumed runs against each other, the kernels' own nondeterminism
    (0 when every kernel has a deterministic version, as they should with deterministic
    algorithms on). `max_diff`, the checked figure: the restored difference, else how far the
    continued difference exceeds twice the floor (a lost optimizer or RNG state exceeds it by far)."""
    from tokenmill.pipeline.training.state import TrainState, rank_rng_state, save_train_state

    with _deterministic():
        task, parts, runner = vqgan_step(sizes, "bf16", folder)
        batches = image_batches(sizes, 2 + sizes.resume_steps, runner.device, seed=1)
        for step in range(2):
            runner.run(task.losses, [batches[step]], step)
        (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
        extra = {"step": runner.state_dict(), "task": task.state_dict()}
        save_train_state(folder / "checkpoint", TrainState(step=2), parts, extra, [rank_rng_state(runner.device)])
        saved = _tensors(parts, runner, task)
        straight = _continue(task, runner, batches[2:]), _tensors(parts, runner, task)
        del task, parts, runner
        restored, resumed = zip(*(_resume(sizes, folder, saved, batches[2:], seed) for seed in (1, 2)))
    continued, floor = _run_diff(straight, resumed[0]), _run_diff(resumed[0], resumed[1])
    worst_restored = max(restored)
    return {"tensors": len(saved), "restored_max_diff": worst_restored, "continued_max_diff": continued,
            "floor_max_diff": floor, "max_diff": worst_restored or max(0.0, continued - 2 * floor)}


def _resume(sizes: Sizes, folder: Path, saved: dict, batches: list[Any], seed: int) -> tuple[float, tuple]:
    """(max difference of the loaded state from `saved`, (losses, tensors) after `batches`)."""
    from tokenmill.pipeline.training.state import load_train_state

    task, parts, runner = vqgan_step(sizes, "bf16", folder, seed=seed)
    state, extra = load_train_state(folder / "checkpoint", parts, runner.device)
    runner.load_state_dict(extra["step"])
    task.load_state_dict(extra["task"])
    restored = _max_diff(saved, _tensors(parts, runner, task)) if state.step == 2 else float("inf")
    return restored, (_continue(task, runner, batches), _tensors(parts, runner, task))


def _run_diff(a: tuple, b: tuple) -> float:
    """Largest difference between two continued runs' (losses, tensors)."""
    losses = max(abs(x - y) if math.isfinite(x - y) else math.inf for x, y in zip(a[0], b[0]))
    return max(losses, _max_diff(a[1], b[1]))


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels where CUDA has them (warn, not fail, where it has none)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts (a fresh phase process)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _continue(task: Any, runner: Any, batches: list[Any]) -> list[float]:
    return [float(runner.run(task.losses, [batch], 2 + i).losses["model"]) for i, batch in enumerate(batches)]


def _tensors(parts: dict[str, Any], runner: Any, task: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the training state, by path (weights, optimizer, EMA, scaler, task state)."""
    out: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> None:
        if torch.is_tensor(value):
            out[path] = value.detach().cpu().clone()
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}/{i}")

    walk({name: part.state_dict() for name, part in parts.items()}, "parts")
    walk({"step": runner.state_dict(), "task": task.state_dict()}, "extra")
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every tensor (inf when the two hold different tensors)."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape:
            return float("inf")
        if x.numel() and not torch.equal(x, y):  # NaN != NaN: a NaN anywhere counts as inf
            worst = max(worst, float((x.double() - y.double()).abs().nan_to_num(nan=math.inf).max()))
    return worst


# -- two GPUs: NCCL -------------------------------------------------------------------------------------

class _DDPContext:
    """The part of a RankContext that `build_parts` and the task need, for a spawned rank."""

    def __init__(self, rank: int, world_size: int, device: torch.device, folder: Path):
        self.rank, self.world_size, self.device, self.folder = rank, world_size, device, folder

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        module = module.to(self.device)
        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def dataset(self, name: str) -> None:
        return None


def nccl_identity(sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Two ranks (NCCL, one GPU each) train the bf16 VQGAN step on different batches; the largest
    difference between the ranks' codebook buffers (every buffer of the model) and discriminator
    weights must be 0. One GPU: n/a. The CPU dry run runs the same rank code as one gloo rank."""
    init = folder / "nccl-init"
    for stale in (init, folder / "ddp-rank0.json"):  # a rerun into the same OUT: a fresh rendezvous
        stale.unlink(missing_ok=True)
    if sizes.device != "cuda":
        _ddp_rank(0, 1, "gloo", sizes, folder, str(init))
    elif torch.cuda.device_count() < 2:
        return {"world_size": 1, "max_diff": "n/a: one GPU"}
    else:
        torch.multiprocessing.spawn(_ddp_rank, args=(2, "nccl", sizes, folder, str(init)), nprocs=2)
    return json.loads((folder / "ddp-rank0.json").read_text())


def _ddp_rank(rank: int, world_size: int, backend: str, sizes: Sizes, folder: Path, init: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world_size)
    try:
        result = _train_and_compare(rank, world_size, sizes, folder)
        gc.collect()  # DDP's reducer holds the group: freed before the group is destroyed, or gloo's teardown hangs
        if rank == 0:
            (folder / "ddp-rank0.json").write_text(json.dumps(result | {"backend": backend}))
    finally:
        dist.destroy_process_group()


def _train_and_compare(rank: int, world_size: int, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Three DDP steps of the VQGAN task on this rank's own batches, then the largest spread of
    every model buffer and discriminator tensor over the ranks (its DDP objects die on return)."""
    device = torch.device("cuda", rank) if dist_backend_is_nccl() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    task, parts, runner = vqgan_step(sizes, "bf16", folder, _DDPContext(rank, world_size, device, folder))
    for step, batch in enumerate(image_batches(sizes, 3, device, seed=100 + rank)):  # each rank its own data
        runner.run(task.losses, [batch], step)
    compared = {f"model/{k}": v for k, v in parts["model"].module.named_buffers()}
    compared |= {f"discriminator/{k}": v for k, v in parts["discriminator"].module.state_dict().items()}
    worst = max(_spread_over_ranks(t, world_size) for t in compared.values())
    return {"world_size": world_size, "tensors": len(compared), "max_diff": worst}


def dist_backend_is_nccl() -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "nccl"


def _spread_over_ranks(tensor: torch.Tensor, world_size: int) -> float:
    """Largest |rank r's value - rank 0's| over every rank (an all_gather: every rank calls it)."""
    import torch.distributed as dist

    value = tensor.detach().to(torch.float64 if tensor.is_floating_point() else torch.int64).contiguous()
    gathered = [torch.empty_like(value) for _ in range(world_size)]
    dist.all_gather(gathered, value)
    return max(float((g - gathered[0]).abs().nan_to_num(nan=math.inf).max()) if g.numel() else 0.0 for g in gathered)


# -- inputs ---------------------------------------------------------------------------------------------

def make_inputs(sizes: Sizes, folder: Path) -> dict[str, Any]:
    """JPEG shards of photo-like pictures at `sizes.px` (eight flips/colour orders of each drawn
    picture: thousands of distinct photos for the cost of drawing hundreds) and an untrained
    VQGAN tokenizer of the check's architecture (speed does not depend on training)."""
    from tokenmill.models import save_model
    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.shards.synthetic import photo_like_images, write_image_shards

    base = photo_like_images(sizes.photos, sizes.px, seed=0)  # (photos, px, px, 3) uint8
    variants = [base[:, :: (-1 if k & 1 else 1), :: (-1 if k & 2 else 1)][..., np.roll([0, 1, 2], k >> 2)]
                for k in range(-(-sizes.images // sizes.photos))]
    images = np.ascontiguousarray(np.concatenate(variants)[: sizes.images])
    shards = write_image_shards(images, folder, "photos", "jpg", maxcount=sizes.per_shard)
    torch.manual_seed(0)
    model = save_model(build_model(vqgan_config(sizes).model).eval(), folder / "vqgan")
    jpeg_bytes = sum(p.stat().st_size for p in Path(shards).glob("*.tar"))
    return {"shards": shards, "model": str(model), "images": len(images), "shard_mib": jpeg_bytes / 2**20}

