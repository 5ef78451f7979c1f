"""The promotion metrics beyond training's validation (`promotion.metric`): LPIPS over the fixed
validation shards, and `prior_bits`, a downstream measure of how well a generator can model a
tokenizer's codes.

prior_bits: the model tokenizes the validation shards (every split) into a store of its own, in
this process (`pipeline.tokens.local_tokenize`); the engine's prior task trains a small prior on
the store's `promotion.prior.train_split` for the fixed budget `promotion.prior`, in this process
(one rank, no Ray, no MLflow, the same seed for every model), and its validation bits per code
token on `validation.split` is the metric. Fewer bits: codes a Transformer predicts better.

rfid / gfid need Inception weights, which this tokenmill cannot load yet: `check_metric` refuses
them before any training, with one line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry.config import INCEPTION_METRICS, METRICS, RetrainConfig

VAE_METRICS = ("nll_nats",)


def check_metric(config: RetrainConfig) -> None:
    """Refuse, before training, a metric that cannot be computed here (UserError, one line)."""
    name = config.metric_name
    if name in INCEPTION_METRICS:
        raise UserError(f"promotion.metric {name} needs Inception weights: this tokenmill has no Inception "
                        f"feature extractor yet (models/inception.py); choose one of "
                        f"{', '.join(m for m in METRICS if m not in INCEPTION_METRICS)}")
    if (name in VAE_METRICS) != config.is_vae:
        family = f"{'VAE' if config.is_vae else 'VQ'} family ({config.model.kind})"
        choices = ", ".join(m for m in METRICS if (m in VAE_METRICS) == config.is_vae and m not in INCEPTION_METRICS)
        raise UserError(f"promotion.metric {name} does not apply to the {family}; choose one of {choices}")
    if name == "lpips":
        _lpips(config)  # the weight files must be there before the challenger trains


def lpips_score(model: Any, batches: Iterator[dict[str, Any]], config: RetrainConfig) -> float:
    """Mean LPIPS between each validation image and its reconstruction (`tokenmill eval`'s measure)."""
    import torch

    from tokenmill.pipeline.shards.stream import to_model_input
    from tokenmill.pipeline.tokenizer_eval import _rgb

    lpips = _lpips(config)
    total, images = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x, _ = to_model_input(batch)  # (B, C, H, W) in [0, 1]
            recon = model(x).recon.float()
            total += float(lpips(_rgb(x) * 2 - 1, _rgb(recon) * 2 - 1).double().sum())
            images += x.shape[0]
    return total / max(images, 1)


def _lpips(config: RetrainConfig):
    from tokenmill.models.lpips import LPIPS, missing_weights, resolve_lpips_weights
    from tokenmill.pipeline.runtime.weights import local_lpips_weights

    weights = local_lpips_weights(config.promotion.lpips, ("promotion.lpips.vgg_path", "promotion.lpips.lin_path"))
    problem = missing_weights(weights)
    if problem:
        raise UserError(f"promotion.metric lpips needs the LPIPS weights: {problem}")
    return LPIPS.from_files(resolve_lpips_weights(weights)).eval()


def prior_bits(files: Any, config: RetrainConfig, shards: str, tracking_uri: str) -> float:
    """Validation bits per token of the budget's prior on model `files`' tokens of `shards`."""
    from tokenmill.pipeline.prior.config import PriorJobConfig
    from tokenmill.pipeline.tokens.local_tokenize import tokenize_in_process
    from tokenmill.pipeline.training.context import LocalContext
    from tokenmill.pipeline.training.loop import LoopSpec, run_rank
    from tokenmill.pipeline.training.tasks.prior import PriorTask

    budget, options = config.promotion.prior, config.data.storage_options
    with tempfile.TemporaryDirectory(prefix="tokenmill-prior-bits-") as tmp:
        store = tokenize_in_process(files, shards, str(Path(tmp) / "tokens.zarr"), config.validation.batch_size,
                                    options)
        steps = budget.steps
        prior = PriorJobConfig.model_validate({
            "data": {"store": store, "train_split": budget.train_split, "val_split": config.validation.split},
            "model": {"dim": budget.dim, "depth": budget.depth, "heads": budget.heads, "label_dropout": 0.0},
            "optim": {"lr": budget.lr, "grad_clip": 1.0, "ema_decay": 0.0, "warmup_steps": 0},
            "train": {"steps": steps, "batch_size": budget.batch_size, "seed": budget.seed, "log_every": steps,
                      "val_every": steps, "checkpoint_every": steps, "sample_every": 0},
            "run": {"name": "prior-bits", "root": tmp}, "tracking": {"log_images": False}})
        task = PriorTask(prior)
        task.prepare(tracking_uri)  # the store's lineage names `files`: its tokenizer checks out
        context = LocalContext(Path(tmp) / "checkpoints", keep=1)
        run_rank(task, context, LoopSpec())  # no tracking: the number goes into the decision table
        return float(context.reports[-1]["val/bits_per_token"])
