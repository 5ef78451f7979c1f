"""`tokenmill demo`: the main job end to end on embedded defaults, on this machine.

1. shard the built-in MNIST-5k digits into WebDataset tars (+ manifest): shuffled, 1,000 per
   shard, so the 5 train shards mix every digit and Ray Data reads them in parallel;
2. train a VQ-VAE (configs/vqvae_mnist.yaml) with 2 DDP workers on local Ray, tracked in the
   project's SQLite MLflow store (runs/mlflow.db beside the runs), and register the model;
3. tokenize every shard into a Zarr token store with the registered model;
4. decode a few token rows back into a PNG grid;
5. train a class-conditional Transformer prior on the token store (configs/prior_mnist.yaml,
   2 DDP workers) and register it;
6. sample new digits from the prior, one row per class, decoded by the store's tokenizer,
then print where everything is. Rerunning resumes: finished shards, training, tokenization and
prior training are found complete and skipped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

PRESET = Path(__file__).resolve().parents[1] / "configs" / "vqvae_mnist.yaml"
PRIOR_PRESET = Path(__file__).resolve().parents[1] / "configs" / "prior_mnist.yaml"


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
    prior_val_bits_per_token: float  # the prior's cross-entropy on the validation digits' codes
    prior_model_uri: str
    samples_png: str  # digits drawn from the prior: one row per class
    mlflow_tracking_uri: str
    mlflow_ui: str  # the command that opens the MLflow UI on the project's store
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_demo(root: Path, steps: int, workers: int, prior_steps: int = 600) -> DemoSummary:
    """Shard MNIST-5k, train, tokenize, decode, train a prior and sample it under `root`."""
    from tokenmill.pipeline.registry.tracking import resolve_tracking_uri
    from tokenmill.pipeline.shards.writer import write_shards
    from tokenmill.pipeline.tokenize.driver import tokenize_dataset
    from tokenmill.pipeline.tokenize.options import TokenizeOptions
    from tokenmill.pipeline.tokens.detokenize import detokenize_store
    from tokenmill.pipeline.training.config import load_train_config
    from tokenmill.pipeline.training.driver import train

    started = time.perf_counter()
    # The project's store (runs/mlflow.db for the default root runs/demo), shared with the runs of
    # `tokenmill train`, `train-prior` and `retrain` started from the same folder.
    tracking_uri = resolve_tracking_uri(None, root)
    root = root.resolve()
    shards = write_shards("builtin:mnist5k", str(root / "shards"))
    print(f"[1/6] shards: {shards['shards']} tars, {shards['samples']} images in {shards['dest']}", flush=True)

    config = load_train_config(PRESET, [
        f"data.shards={root / 'shards'}", f"run.root={root}", f"train.steps={steps}",
        f"train.val_every={steps}", f"train.checkpoint_every={max(steps // 4, 1)}",
        f"scaling.num_workers={workers}", "run.name=demo-vqvae", f"tracking.tracking_uri={tracking_uri}",
    ])
    print(f"[2/6] training a VQ-VAE for {steps} steps on {workers} Ray workers ...", flush=True)
    trained = train(config)

    store_url = str(root / "tokens.zarr")
    print(f"[3/6] tokenizing {shards['samples']} images with {trained.model_uri} ...", flush=True)
    tokens = tokenize_dataset(trained.model_uri, str(root / "shards"), store_url,
                              TokenizeOptions(tracking_uri=trained.mlflow_tracking_uri))
    grids = detokenize_store(store_url, root / "decoded", 0, 64, tracking_uri=trained.mlflow_tracking_uri)
    print(f"[4/6] decoded 64 token rows back into {grids[0]}", flush=True)

    prior, samples = _train_and_sample_prior(root, store_url, prior_steps, workers, trained.mlflow_tracking_uri)
    metrics = trained.final_metrics
    summary = DemoSummary(
        reconstruction_psnr_db=metrics["val/psnr"], codebook_usage=metrics["val/usage"],
        tokenize_img_per_s=tokens.img_per_s, train_img_per_s=metrics["img_per_s"], shards=shards["dest"],
        model_dir=trained.model_dir, model_uri=trained.model_uri, token_store=store_url,
        decoded_png=str(grids[0]), prior_val_bits_per_token=prior.final_metrics["val/bits_per_token"],
        prior_model_uri=prior.model_uri, samples_png=samples.png, mlflow_tracking_uri=trained.mlflow_tracking_uri,
        mlflow_ui=f"mlflow ui --backend-store-uri {trained.mlflow_tracking_uri}",
        seconds=time.perf_counter() - started,
    )
    _print_summary(summary, tokens.samples)
    return summary


def _train_and_sample_prior(root: Path, store_url: str, steps: int, workers: int, tracking_uri: str):
    """Steps 5 and 6: the prior (configs/prior_mnist.yaml, tracked in the demo's MLflow store) and
    8 sampled digits per class from it, decoded by the tokenizer its lineage names."""
    from tokenmill.pipeline.prior.config import load_prior_config
    from tokenmill.pipeline.prior.sampling import SampleOptions, sample_prior
    from tokenmill.pipeline.training.driver import train_prior

    config = load_prior_config(PRIOR_PRESET, [
        f"data.store={store_url}", f"run.root={root}", "run.name=demo-prior", f"train.steps={steps}",
        "train.batch_size=32",  # 64 digits a step over both workers: ~0.3 s a step on 2 cores
        f"train.val_every={steps}", f"train.checkpoint_every={max(steps // 4, 1)}", "train.sample_every=0",
        f"scaling.num_workers={workers}", f"tracking.tracking_uri={tracking_uri}",
    ])
    print(f"[5/6] training a Transformer prior on the tokens for {steps} steps on {workers} Ray workers ...",
          flush=True)
    prior = train_prior(config)
    options = SampleOptions(cfg_scale=config.sample.cfg_scale, temperature=config.sample.temperature,
                            top_k=config.sample.top_k, seed=config.train.seed)
    samples = sample_prior(prior.model_uri, root / "samples", n=config.sample.per_class, options=options,
                           tracking_uri=tracking_uri)
    print(f"[6/6] sampled {samples.samples} digits from the prior into {samples.png}", flush=True)
    return prior, samples


def _print_summary(summary: DemoSummary, tokenized: int) -> None:
    print(f"\ntokenmill demo done in {summary.seconds:.0f}s")
    print(f"  reconstruction PSNR  {summary.reconstruction_psnr_db:.2f} dB (500 validation digits)")
    print(f"  codebook usage       {summary.codebook_usage:.1%} of codes on the validation split")
    print(f"  tokenization         {summary.tokenize_img_per_s:.0f} img/s, {tokenized} images")
    print(f"  shards               {summary.shards}")
    print(f"  model                {summary.model_dir}  ({summary.model_uri})")
    print(f"  token store          {summary.token_store}   (tokenmill inspect {summary.token_store})")
    print(f"  decoded tokens       {summary.decoded_png}")
    print(f"  prior                {summary.prior_val_bits_per_token:.3f} bits/token on validation codes  "
          f"({summary.prior_model_uri})")
    print(f"  sampled digits       {summary.samples_png}   (one row per class)")
    print(f"  MLflow UI            {summary.mlflow_ui}")
