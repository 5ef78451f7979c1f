"""`tokenmill bench train`: img/s of the Ray Train job (1 and 2 workers) vs a plain PyTorch loop.

All runs train the same model (the `model` section of --config) with the config's optimiser,
the same batch per step and worker, and the same in-memory data: the MNIST-5k train split as
uint8 images. The plain loop is the engine's optimizer step (`pipeline.training.step.StepRunner`,
the one every Ray rank runs) in this process on shuffled batches
of an in-memory tensor, converted per batch like the stream does (`to_model_input`), with torch
on all CPUs; it runs right before and right after the 1-worker Ray run, and the mean of the two
is the baseline (load that drifts during the run hits both sides alike). The Ray runs are our
job's worker loop (`pipeline.training.loop.ray_train_loop`, the tokenizer task) under a TorchTrainer fed a
materialized Ray Dataset of the same arrays: 1 worker with all CPUs, then 2 workers with half
each (the worker sets torch's threads to its CPUs). Validation and the checkpoint happen
once, at the end; MLflow writes to a temporary SQLite file. Every number is training-only
throughput with the first step excluded (Ray: the job's own `img_per_s`, over all ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vqvae_mnist.yaml"
VAL_IMAGES = 256


def register(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.jobs.cli import add_json_option, positive_int

    parser = subparsers.add_parser(
        "train", help="the Ray Train job (1 and 2 workers) vs a plain PyTorch loop, img/s on MNIST-5k",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.batch_size=32 (repeatable)")
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per run (default %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="train on CUDA (NCCL; with --set train.precision=bf16 "
                        "for autocast); the 2-worker run needs 2 GPUs and is skipped otherwise")
    parser.add_argument("--one-worker", action="store_true",
                        help="skip the 2-worker Ray run: the ratio (1 worker / plain) alone, in about half the time")
    add_json_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from tokenmill.pipeline.runtime.ray_connection import ensure_ray
    from tokenmill.pipeline.shards.sources import load_builtin
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.precision import resolve_precision

    cpus = os.cpu_count() or 1
    config = load_train_config(args.config, [*args.overrides, f"train.steps={args.steps}"])
    data = load_builtin("builtin:mnist5k")
    train, val = data.split("train"), data.split("val")
    result: dict[str, Any] = {"model": config.model.kind, "steps": args.steps, "batch_size": config.train.batch_size,
                              "cpu_count": cpus, "threads": cpus}
    device = "cuda" if args.gpu else "cpu"
    result.update(device=device, precision=resolve_precision(config.train.precision, torch.device(device)))
    plain = [plain_img_per_s(config, train.images, train.labels, threads=cpus, device=device)]

    started_ray = not ray.is_initialized()
    ensure_ray()
    try:
        datasets = _ray_datasets(train, val)
        with tempfile.TemporaryDirectory(prefix="tokenmill-bench-train-") as root:
            job = dict(args=args, root=root, datasets=datasets)
            result["ray_1w_img_s"] = ray_img_per_s(**job, workers=1, cpus_per_worker=cpus)
            plain.append(plain_img_per_s(config, train.images, train.labels, threads=cpus, device=device))
            two_workers = not args.one_worker and (not args.gpu or _cuda_devices() >= 2)
            result["ray_2w_img_s"] = (ray_img_per_s(**job, workers=2, cpus_per_worker=max(1, cpus // 2))
                                      if two_workers else None)
    finally:
        if started_ray:
            ray.shutdown()
    result["plain_img_s_runs"] = plain
    result["plain_img_s"] = sum(plain) / len(plain)
    result["ratio"] = result["ray_1w_img_s"] / result["plain_img_s"]
    _print_table(result)
    return result


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plain_img_per_s(config, images, labels, threads: int, device: str = "cpu") -> float:
    """One process, the engine's step, shuffled in-memory batches; the first step is not timed."""
    import torch

    from tokenmill.models.serialization import build_model
    from tokenmill.pipeline.shards.stream import to_model_input
    from tokenmill.pipeline.training.optim import Part
    from tokenmill.pipeline.training.precision import resolve_precision
    from tokenmill.pipeline.training.step import StepRunner, own_loss

    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    steps, batch = config.train.steps, config.train.batch_size
    model = build_model(config.model).to(device)
    optim = dataclasses.replace(config.optim, total_steps=config.optim.total_steps or steps)
    trainer = StepRunner({"model": Part("model", model, model, optim)},
                         resolve_precision(config.train.precision, torch.device(device)), torch.device(device))
    kl_weight = config.kl if getattr(model, "has_kl", False) else None
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    generator = torch.Generator().manual_seed(config.train.seed)
    per_epoch = len(images) // batch  # drop_last, as the job
    for step in range(steps):
        position = step % per_epoch
        if position == 0:
            order = torch.randperm(len(images), generator=generator)
        index = order[position * batch:(position + 1) * batch]
        x, y = to_model_input({"image": images[index], "label": labels[index]})
        trainer.run(own_loss, [(x, y, *([kl_weight(step)] if kl_weight else []))], step)
        if step == 0:
            start = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
    return (steps - 1) * batch / (time.perf_counter() - start)


def _ray_datasets(train, val) -> dict[str, Any]:
    """Materialized Ray Datasets of the arrays, with the stream's columns: image (H, W, C) uint8, label int64."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False

    def rows(images, labels):
        return [{"image": image, "label": int(label)} for image, label in zip(images, labels)]

    return {"train": ray.data.from_items(rows(train.images, train.labels)).materialize(),
            "val": ray.data.from_items(rows(val.images[:VAL_IMAGES], val.labels[:VAL_IMAGES])).materialize()}


def ray_img_per_s(args: argparse.Namespace, root: str, datasets: dict[str, Any], workers: int,
                  cpus_per_worker: int) -> float:
    """Our training job's TorchTrainer; its reported `img_per_s` (all ranks)."""
    from tokenmill.pipeline.registry import tracking
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.driver import build_torch_trainer
    from tokenmill.pipeline.training.loop import LoopSpec
    from tokenmill.pipeline.training.task import Inputs
    from tokenmill.pipeline.training.tasks.image_data import ingest_config
    from tokenmill.pipeline.training.tasks.tokenizer import TokenizerTask

    steps = args.steps
    config = load_train_config(args.config, [
        *args.overrides, f"train.steps={steps}", f"train.val_every={steps}", f"train.checkpoint_every={steps}",
        "tracking.log_images=false", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        f"run.root={root}", f"run.name=bench-{workers}w", "run.max_failures=0",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus_per_worker}",
        f"scaling.use_gpu={str(args.gpu).lower()}",
    ])
    run_id = tracking.get_or_create_run(config.tracking.tracking_uri, config.tracking.experiment, config.run.name,
                                        tags={"tokenmill.benchmark": "train"}, run_dir=root)
    inputs = Inputs(datasets, data_config=ingest_config(datasets))
    trainer = build_torch_trainer(TokenizerTask(config), LoopSpec(config.tracking.tracking_uri, run_id), inputs)
    return float(trainer.fit().metrics["img_per_s"])


def _print_table(result: dict[str, Any]) -> None:
    cpus = result["cpu_count"]
    print(f"{result['model']} on MNIST-5k, {result['steps']} steps of {result['batch_size']} images per worker, "
          f"{cpus} CPUs")
    print(f"{'run':<16}{'workers':>8}{'threads':>9}{'img/s':>10}")
    for name, key, workers in (("plain PyTorch", "plain_img_s", 1), ("Ray Train job", "ray_1w_img_s", 1),
                               ("Ray Train job", "ray_2w_img_s", 2)):
        if result[key] is None:
            continue
        print(f"{name:<16}{workers:>8}{max(1, cpus // workers):>9}{result[key]:>10.1f}")
    before, after = result["plain_img_s_runs"]
    print(f"plain PyTorch before / after the 1-worker Ray run: {before:.1f} / {after:.1f} img/s")
    print(f"ratio Ray 1 worker / plain: {result['ratio']:.3f} (target >= 0.85)")
