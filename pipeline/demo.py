"""`tokenmill demo`: the main job end to end on embedded defaults, on this machine.

1. shard the built-in MNIST-5k digits into WebDataset tars (+ manifest): shuffled, 1,000 per
   shard, so the 5 train shards mix every digit and Ray Data reads them in parallel;
2. train a VQ-VAE (configs/vqvae_mnist.yaml) with 2 DDP workers on local Ray, tracked in a
   SQLite MLflow store, and register the model;
3. tokenize every shard into a Zarr token store with the registered model;
4. decode a few token rows back into a PNG grid,
then print where everything is. Rerunning resumes: finished shards, training and tokenization
are found complete and skipped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

PRESET = Path(__file__).resolve().parents[1] / "configs" / "vqvae_mnist.yaml"


@dataclasses.dataclass
class DemoSummary:
    """Where everything went and how well it did; `to_json()` is what `tokenmill demo --json` writes."""

    reconstruction_psnr_db: float
    codebook_usage: float  # fraction of codes used on the validation split
    tokenize_img_per_s: float
    train_img_per_s: float
    shards: str
    model_dir: str
    model_uri: str
    token_store: str
    decoded_png: str
    mlflow_tracking_uri: str
    mlflow_ui: str  # the command that opens the MLflow UI on this run's store
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_demo(root: Path, steps: int, workers: int) -> DemoSummary:
    """Shard MNIST-5k, train, tokenize and decode under `root`; returns the summary."""
    from pipeline.shards.writer import write_shards
    from pipeline.tokenize import tokenize_dataset
    from pipeline.tokens.detokenize import detokenize_store
    from pipeline.training.config import load_train_config
    from pipeline.training.trainer import train

    started = time.perf_counter()
    root = root.resolve()
    shards = write_shards("builtin:mnist5k", str(root / "shards"))
    print(f"[1/4] shards: {shards['shards']} tars, {shards['samples']} images in {shards['dest']}", flush=True)

    config = load_train_config(PRESET, [
        f"data.shards={root / 'shards'}", f"run.root={root}", f"train.steps={steps}",
        f"train.val_every={steps}", f"train.checkpoint_every={max(steps // 4, 1)}",
        f"scaling.num_workers={workers}", "run.name=demo-vqvae",
    ])
    print(f"[2/4] training a VQ-VAE for {steps} steps on {workers} Ray workers ...", flush=True)
    trained = train(config)

    store_url = str(root / "tokens.zarr")
    print(f"[3/4] tokenizing {shards['samples']} images with {trained.model_uri} ...", flush=True)
    tokens = tokenize_dataset(trained.model_uri, str(root / "shards"), store_url,
                              tracking_uri=trained.mlflow_tracking_uri)
    grids = detokenize_store(store_url, root / "decoded", 0, 64, tracking_uri=trained.mlflow_tracking_uri)
    print(f"[4/4] decoded 64 token rows back into {grids[0]}", flush=True)

    metrics = trained.final_metrics
    summary = DemoSummary(
        reconstruction_psnr_db=metrics["val/psnr"], codebook_usage=metrics["val/usage"],
        tokenize_img_per_s=tokens.img_per_s, train_img_per_s=metrics["img_per_s"], shards=shards["dest"],
        model_dir=trained.model_dir, model_uri=trained.model_uri, token_store=store_url,
        decoded_png=str(grids[0]), mlflow_tracking_uri=trained.mlflow_tracking_uri,
        mlflow_ui=f"mlflow ui --backend-store-uri {trained.mlflow_tracking_uri}",
        seconds=time.perf_counter() - started,
    )
    _print_summary(summary, tokens.samples)
    return summary


def _print_summary(summary: DemoSummary, tokenized: int) -> None:
    print(f"\ntokenmill demo done in {summary.seconds:.0f}s")
    print(f"  reconstruction PSNR  {summary.reconstruction_psnr_db:.2f} dB (500 validation digits)")
    print(f"  codebook usage       {summary.codebook_usage:.1%} of codes on the validation split")
    print(f"  tokenization         {summary.tokenize_img_per_s:.0f} img/s, {tokenized} images")
    print(f"  shards               {summary.shards}")
    print(f"  model                {summary.model_dir}  ({summary.model_uri})")
    print(f"  token store          {summary.token_store}   (tokenmill inspect {summary.token_store})")
    print(f"  decoded tokens       {summary.decoded_png}")
    print(f"  MLflow UI            {summary.mlflow_ui}")
