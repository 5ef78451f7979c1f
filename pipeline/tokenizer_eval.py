"""`tokenmill eval`: a tokenizer judged over a whole split under a pinned protocol.

Every good sample of the split's shards is read once, in manifest then tar order, through the one
shard reader with the transform saved with the model (its eval form: center crop, no flip), and
reconstructed as `decode(encode(x))` (the model's eval-mode forward; a `diffusers:` autoencoder's
through the adapter, as its store decodes: codes, or float16 latents, so no codebook metrics). Metrics:
  - PSNR, SSIM, MSE, hf_ratio: `models.image_metrics.ReconstructionMetrics` (what training validation uses);
  - codebook usage, perplexity and code entropy (bits) from counts over the whole split;
  - LPIPS (VGG, v0.1) when its two weight files are present (`models.lpips`), with their sha256;
  - rFID: the Frechet distance between FID-Inception features of the originals and of their
    reconstructions (`pipeline.generation_eval`: torch-fidelity's Inception, weights by path or
    fsspec URL, sha256 checked), under the protocol in `protocol["rfid"]`; without the weights
    file, "unavailable: <which file goes where>" and every other metric still runs.
Nothing is random and the order is fixed, so two runs give identical numbers. A PNG shows the
first 8 originals above their reconstructions; with a tracking URI everything also goes to MLflow.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.models.code_usage import CodebookStats
from tokenmill.models.errors import UserError
from tokenmill.models.image_metrics import ReconstructionMetrics
from tokenmill.models.inception_metrics import FeatureStats, frechet_distance
from tokenmill.models.lpips import LIN_SHA256, LPIPS, VGG_SHA256, LPIPSWeights, missing_weights, resolve_lpips_weights
from tokenmill.models.tokenizer import code_scales, counted_levels
from tokenmill.pipeline.generation_eval import Evaluator, InceptionWeights, evaluator_or_unavailable, inception_protocol
from tokenmill.pipeline.grids import save_png_grid
from tokenmill.pipeline.runtime.weights import local_lpips_weights
from tokenmill.pipeline.shards.manifest import shards_for_split
from tokenmill.pipeline.shards.reader import good_samples, pixels_decoder, read_shard, sample_batches
from tokenmill.pipeline.tokens.diffusers_adapter import DiffusersFiles, DiffusersReconstruction

PROTOCOL_VERSION = "tokenmill-eval/2"  # 2: rFID through tokenmill's FID Inception, its protocol recorded
PNG_IMAGES = 8
_DIFFUSERS_RECON = ("diffusers {}: decode(encode(x)) through tokenmill's diffusers adapter, as a store made by "
                    "tokenize decodes ({}), clamped to [0, 1]")
RECONSTRUCTION = {  # diffusers classes: how eval reconstructs (tokenmill models: their eval forward)
    "VQModel": _DIFFUSERS_RECON.format("VQModel", "its codes through the codebook"),
    "AutoencoderKL": _DIFFUSERS_RECON.format("AutoencoderKL", "the posterior mean, scaled and rounded to float16"),
    "AutoencoderDC": _DIFFUSERS_RECON.format("AutoencoderDC", "its latents, scaled and rounded to float16"),
}


@dataclasses.dataclass
class EvalSummary:
    """`to_json()` is what `tokenmill eval --json` writes: identical for identical inputs."""

    model: str
    model_sha256: str
    data: str
    split: str
    protocol: dict[str, Any]
    metrics: dict[str, float]
    lpips: str | dict[str, str]  # the weights' paths and sha256, or "unavailable: ..."
    rfid: str | dict[str, Any]  # the Inception weights (path, sha256, published) and images, or "unavailable: ..."
    skipped_samples: dict[str, Any]
    png: str
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EvalOptions:
    batch_size: int = 64
    lpips: LPIPSWeights = dataclasses.field(default_factory=lambda: LPIPSWeights(verify_sha256=False))
    inception: InceptionWeights = dataclasses.field(default_factory=InceptionWeights)
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI; neither: no MLflow (unless `experiment`)
    # The MLflow experiment to log to; naming one logs even without a tracking URI, to the
    # project's store (runs/mlflow.db), so evals sit beside the training runs of that experiment.
    experiment: str | None = None


def evaluate(model_ref: str, data: str, split: str, out_dir: str | Path, options: EvalOptions) -> EvalSummary:
    from tokenmill.pipeline.registry.resolver import resolve_reference
    from tokenmill.pipeline.registry.tracking import resolve_tracking_uri
    from tokenmill.pipeline.tokens.encoder import model_transform

    tracking_uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # where the results are logged
    # runs:/ and models:/ come from `tracking_uri`, else this folder's project store (runs/mlflow.db).
    files = resolve_reference(model_ref, tracking_uri, options.storage_options)
    if isinstance(files, DiffusersFiles):  # its transform: the config's sample_size, center crop
        model = DiffusersReconstruction(files)
        meta, transform = {"class": files.class_name}, model.tokenizer.transform.for_eval()
    else:
        model, meta = files.load()
        if not hasattr(model, "codebook_size"):
            raise UserError(f"{model_ref} is a {meta['class']}; tokenmill eval measures tokenizers (VQ family)")
        transform = model_transform(meta).for_eval()
    model.eval().requires_grad_(False)
    urls = shards_for_split(data, split, options.storage_options)  # UserError: no such split / manifest
    lpips, lpips_info = _lpips(options.lpips)
    inception = evaluator_or_unavailable(options.inception)  # a wrong file is a UserError, an absent one is not
    torch.manual_seed(0)  # nothing below draws; pinned anyway so a future quantizer cannot vary runs
    run = _Accumulators(model, lpips, inception if isinstance(inception, Evaluator) else None)
    errors: list[dict[str, str]] = []
    for url in tqdm(urls, desc=f"eval {split}", unit="shard", leave=False):
        samples = good_samples(read_shard(url, pixels_decoder(transform), options.storage_options), errors)
        for images, _, _ in sample_batches(samples, options.batch_size):
            run.update(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0))  # (B, C, H, W)
    if run.images == 0:
        raise UserError(f"{data}: the {split} split has no readable image")
    png = save_png_grid(torch.cat([run.first, run.first_recon]), Path(out_dir) / "reconstructions.png",
                        nrow=max(1, run.first.shape[0]))
    summary = EvalSummary(
        model=model_ref, model_sha256=files.weights_sha256, data=data, split=split,
        protocol=_protocol(transform, options, meta, inception, split, run.images), metrics=run.result(),
        lpips=lpips_info, rfid=_rfid_info(inception, run.images),
        skipped_samples={"count": len(errors), "samples": errors[:20]}, png=str(png),
    )
    log_uri = tracking_uri or (resolve_tracking_uri(None) if options.experiment else None)
    if log_uri:
        summary.mlflow_run_id = _log_to_mlflow(summary, log_uri, options.experiment or "tokenmill-eval", out_dir)
    return summary


def _protocol(transform, options: EvalOptions, meta: dict[str, Any], inception: Evaluator | str, split: str,
              images: int) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "transform": transform.model_dump(mode="json"),  # resize / crop to the model's size, no randomness
        "reconstruction": RECONSTRUCTION.get(meta["class"], "model eval forward = decode(encode(x)), clamped to [0, 1]"),
        "evaluator": "tokenmill.models.image_metrics.ReconstructionMetrics: per-image MSE and PSNR (dB, peak 1), SSIM "
                     "(Gaussian 11/1.5, reflect padding, as torchmetrics), hf_ratio (FFT power above 0.25 "
                     "cycles/px, recon/original); float64 sums over every image",
        "codebook": "counts over the whole split; usage = codes used / K, perplexity = exp(H), entropy in bits",
        "lpips": "VGG16 + lpips v0.1 linear heads, inputs scaled to [-1, 1], mean over images",
        "rfid": inception_protocol(inception, resolution=transform.size, resize_filter="PIL bilinear (none for "
                                   "images already at the resolution)", crop=transform.resize, split=split, n=images,
                                   cfg=None, compared="originals vs their reconstructions, both from this split"),
        "batch_size": options.batch_size,
        "model_class": meta["class"],
    }


class _Accumulators:
    """Running sums over batches: reconstruction metrics, code counts, LPIPS, Inception features."""

    def __init__(self, model: torch.nn.Module, lpips: LPIPS | None, inception: Evaluator | None) -> None:
        self.model, self.lpips, self.inception = model, lpips, inception
        self.recon = ReconstructionMetrics()
        shape, shared = model.token_shape, bool(code_scales(model))  # multi-scale: one codebook, all scales
        stages = shape[-1] if len(shape) == 3 and not shared else 1
        counted = model.codebook_size is not None and (shared or not isinstance(shape[0], tuple))  # None: latents
        self.codes = CodebookStats(model.codebook_size, stages) if counted else None
        self.lpips_sum, self.images = 0.0, 0
        self.features: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (b, 2048) pools: originals, recons
        self.first = self.first_recon = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        output = self.model(x)
        recon = output.recon.float()  # (B, C, H, W) in [0, 1]
        self.recon.update(x, recon)
        self.images += x.shape[0]
        if self.codes is not None:
            self.codes.update(counted_levels(self.model, output.indices)[0])
        if self.lpips is not None:
            self.lpips_sum += float(self.lpips(_rgb(x) * 2 - 1, _rgb(recon) * 2 - 1).double().sum())
        if self.inception is not None:
            for side, images in zip(self.features, (x, recon)):
                side.append(self.inception.features(images)[0])
        if self.first is None:
            self.first, self.first_recon = x[:PNG_IMAGES], recon[:PNG_IMAGES]

    def result(self) -> dict[str, float]:
        metrics = self.recon.result()
        if self.codes is not None:
            metrics |= {"usage": self.codes.usage, "perplexity": self.codes.perplexity,
                        "code_entropy_bits": math.log2(self.codes.perplexity)}
        if self.lpips is not None:
            metrics["lpips"] = self.lpips_sum / self.images
        if self.inception is not None and self.images >= 2:  # a covariance needs two images
            originals, recons = (FeatureStats.of(torch.cat(side)) for side in self.features)
            metrics["rfid"] = frechet_distance(originals, recons)
        return metrics


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _lpips(weights: LPIPSWeights) -> tuple[LPIPS | None, str | dict[str, str]]:
    weights = local_lpips_weights(weights, ("--lpips-vgg", "--lpips-lin"))  # a URL the user names must be there
    problem = missing_weights(weights)
    if problem:
        return None, f"unavailable: {problem}"
    found = resolve_lpips_weights(weights)
    published = found.vgg_sha256.startswith(VGG_SHA256) and found.lin_sha256 == LIN_SHA256
    return LPIPS.from_files(found), {**found.describe(), "published_weights": str(published).lower()}


def _rfid_info(inception: Evaluator | str, images: int) -> str | dict[str, Any]:
    if isinstance(inception, str):
        return inception
    if images < 2:
        return f"unavailable: the split has {images} image; a Frechet distance needs at least 2"
    return {**inception.weights, "images": images}


def _log_to_mlflow(summary: EvalSummary, tracking_uri: str, experiment: str, out_dir: str | Path) -> str:
    """One MLflow run named after the output folder (`eval-before`, `eval-after`: one model's evals
    side by side in the experiment's table), with the protocol as params."""
    import mlflow

    from tokenmill.pipeline.registry.tracking import flatten

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    folder = Path(out_dir).name
    with mlflow.start_run(run_name=folder if folder.startswith("eval") else f"eval-{folder}") as run:
        mlflow.log_params(flatten({"protocol": summary.protocol, "model": summary.model, "data": summary.data,
                                   "split": summary.split}))
        mlflow.set_tags({"tokenmill.model_sha256": summary.model_sha256,
                         "tokenmill.lpips": str(summary.lpips)[:5000], "tokenmill.rfid": str(summary.rfid)[:5000]})
        mlflow.log_metrics({k: v for k, v in summary.metrics.items() if math.isfinite(v)})
        mlflow.log_artifact(summary.png)
        mlflow.log_dict(summary.to_json(), "eval.json")
        return run.info.run_id
