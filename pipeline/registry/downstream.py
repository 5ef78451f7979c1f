"""The promotion metrics beyond training's validation (`promotion.metric`): LPIPS over the fixed
validation shards, and `prior_bits`, a downstream measure of how well a generator can model a
tokenizer's codes.

prior_bits: the model tokenizes the validation shards (every split) into a store of its own, in
the scoring process (a Ray task under retrain: `pipeline.registry.scoring`), through
`pipeline.tokens.local_tokenize`; the engine's prior task trains a small prior on the store's
`promotion.prior.train_split` for the fixed budget `promotion.prior`, in that process (one rank,
no Ray Train, no MLflow, the same seed for every model), and its validation bits per code
token on `validation.split` is the metric. Fewer bits: codes a Transformer predicts better.

rfid: the Frechet distance between FID-Inception features of the validation images and of their
reconstructions (`tokenmill eval`'s rFID), weights from `promotion.inception`; `check_metric` loads
them before any training. gfid would need a prior trained and sampled per model: refused, with
prior_bits named as the downstream measure retrain computes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry.config import METRICS, RetrainConfig

VAE_METRICS = ("nll_nats",)


def check_metric(config: RetrainConfig) -> None:
    """Refuse, before training, a metric that cannot be computed here (UserError, one line)."""
    name = config.metric_name
    if name == "gfid":
        raise UserError("promotion.metric gfid needs a prior trained and sampled for each model, which retrain "
                        "does not do; use prior_bits (the bits per token a prior needs for each model's codes), "
                        "or score samples with `tokenmill sample --eval`")
    if (name in VAE_METRICS) != config.is_vae:
        family = f"{'VAE' if config.is_vae else 'VQ'} family ({config.model.kind})"
        choices = ", ".join(m for m in METRICS if (m in VAE_METRICS) == config.is_vae and m != "gfid")
        raise UserError(f"promotion.metric {name} does not apply to the {family}; choose one of {choices}")
    if name == "lpips":
        lpips_model(config)  # the weight files must be there before the challenger trains
    if name == "rfid":
        inception_model(config)


def lpips_sums(model: Any, batches: Iterator[dict[str, Any]], lpips: Any) -> tuple[float, int]:
    """(sum of LPIPS between each image and its reconstruction, images) over `batches`: the mean
    over shares is `tokenmill eval`'s measure. `lpips`: `lpips_model` on the model's device."""
    import torch

    from tokenmill.pipeline.shards.stream import to_model_input
    from tokenmill.pipeline.tokenizer_eval import _rgb

    total, images = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x, _ = to_model_input(batch, device)  # (B, C, H, W) in [0, 1]
            recon = model(x).recon.float()
            total += float(lpips(_rgb(x) * 2 - 1, _rgb(recon) * 2 - 1).double().sum())
            images += x.shape[0]
    return total, images


def inception_features(model: Any, batches: Iterator[dict[str, Any]], evaluator: Any) -> tuple[Any, Any]:
    """FID-Inception pools (n, 2048) of the images of `batches` and of their reconstructions, on
    the CPU; rFID is the Frechet distance of the whole split's (`rfid`)."""
    import torch

    from tokenmill.pipeline.shards.stream import to_model_input

    features: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # originals, recons
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x, _ = to_model_input(batch, device)  # (B, C, H, W) in [0, 1]
            for side, images in zip(features, (x, model(x).recon.float())):
                side.append(evaluator.features(images)[0].cpu())
    return tuple(torch.cat(side) if side else torch.zeros(0, 2048) for side in features)


def rfid(originals: Any, recons: Any) -> float:
    """rFID of (N, 2048) original and reconstruction pools (`tokenmill eval`'s rFID)."""
    from tokenmill.models.inception_metrics import FeatureStats, frechet_distance

    return frechet_distance(FeatureStats.of(originals), FeatureStats.of(recons))


def inception_model(config: RetrainConfig, device: Any = "cpu"):
    from tokenmill.pipeline.generation_eval import InceptionWeights, load_evaluator

    weights = config.promotion.inception
    try:
        return load_evaluator(InceptionWeights(weights.path, weights.sha256, config.data.storage_options), device)
    except UserError as err:
        raise UserError(f"promotion.metric rfid needs FID's Inception weights: {err}") from None


def lpips_model(config: RetrainConfig, device: Any = "cpu"):
    from tokenmill.models.lpips import LPIPS, missing_weights, resolve_lpips_weights
    from tokenmill.pipeline.runtime.weights import local_lpips_weights

    weights = local_lpips_weights(config.promotion.lpips, ("promotion.lpips.vgg_path", "promotion.lpips.lin_path"))
    problem = missing_weights(weights)
    if problem:
        raise UserError(f"promotion.metric lpips needs the LPIPS weights: {problem}")
    return LPIPS.from_files(resolve_lpips_weights(weights)).eval().to(device)


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
