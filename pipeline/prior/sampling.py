"""`tokenmill sample`: draw codes from a trained prior and decode them with its tokenizer.

The prior is any model reference (`pipeline.registry.model_ref`); its `lineage.json` names the
tokenizer (`tokenizer_uri`, and where to find it: `pipeline.registry.resolver`), whose weights must
hash to the recorded `tokenizer_sha256`. An
explicit tokenizer replaces it after a compatibility check (codebook size, levels, token shape
against the prior's grid). Output: `samples.png` (one row per class), `codes.npy` (n, N) int64
in store order and `labels.npy` (n,) int64 (-1 for an unconditional prior).

The prior is an AR `TransformerPrior` or a `MaskGITPrior` (any model whose config is a
`PriorConfig`); `steps` (`--steps`) sets a MaskGIT prior's decoding steps and is refused for others.

With a `SampleEval` (`--eval REF.npz`, `--npz PATH`) the decoded samples are also scored against
reference statistics from `tokenmill fid-stats` (gFID, Inception Score, precision/recall, with the
protocol: `pipeline.generation_eval.score_samples`) and/or written as the ADM evaluator's .npz.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.models.prior import PriorConfig
from tokenmill.pipeline.generation_eval import SampleEval, log_result_run, score_samples, write_adm_npz
from tokenmill.pipeline.grids import save_png_grid
from tokenmill.pipeline.prior.lineage import LINEAGE_FILE, parse_prior_lineage
from tokenmill.pipeline.registry.resolver import Recorded, resolve_recorded, resolve_reference

DECODE_BATCH = 256


@dataclass
class SampleSummary:
    prior: str
    tokenizer: str
    device: str
    classes: list[int] | None  # None: an unconditional prior
    per_class: int  # samples per class (all samples when unconditional)
    samples: int
    cfg_scale: float
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    steps: int | None  # MaskGIT decoding steps asked for (None: the prior's default, or an AR prior)
    codes_shape: list[int]
    png: str
    codes: str
    labels: str
    seconds: float  # sampling only (no loading, no decoding)
    tokens_per_s: float
    evaluation: dict[str, Any] | None = None  # score_samples' result (metrics, unavailable, protocol, inception)
    npz: dict[str, str] | None = None  # the ADM .npz written: path, sha256
    mlflow_run_id: str | None = None  # the evaluation's MLflow run

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SampleOptions:
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    steps: int | None = None  # MaskGIT priors: parallel decoding steps (None: the config's sample_steps)
    batch_size: int = 256  # rows per sampling batch (x2 with guidance)


def sample_prior(prior_ref: str, out: Path, *, classes: list[int] | None = None, n: int = 8,
                 options: SampleOptions | None = None, tokenizer_ref: str | None = None, device: str = "auto",
                 tracking_uri: str | None = None, storage_options: dict | None = None,
                 evaluate: SampleEval | None = None) -> SampleSummary:
    """Sample `n` codes per class (all classes when `classes` is None; `n` in all for an
    unconditional prior), decode them and write the PNG grid, codes.npy and labels.npy to `out`;
    with `evaluate`, score them and/or write them as ADM's .npz."""
    options = options or SampleOptions()
    dev = resolve_device(device)
    prior, lineage = load_prior(prior_ref, dev, tracking_uri, storage_options)
    if options.steps is not None and not takes_steps(prior):
        raise UserError(f"--steps sets a MaskGIT prior's decoding steps; {prior_ref} is a `kind: "
                        f"{prior.config.kind}` prior, which draws one code per step (drop --steps)")
    tokenizer, tokenizer_uri, found = load_tokenizer(prior.config, lineage, prior_ref, tokenizer_ref, dev,
                                                     tracking_uri, storage_options)
    labels = sample_labels(prior.config, classes, n)
    if found:  # every input accepted: say where the lineage's tokenizer was found
        found.announce()
    start = time.perf_counter()
    codes = draw_codes(prior, labels, options, dev, n=n)  # (n_all, N) int64 on CPU
    seconds = time.perf_counter() - start
    images = codes_to_images(tokenizer, codes, prior.config.grid)  # (n_all, C, H, W)
    out.mkdir(parents=True, exist_ok=True)
    png = save_png_grid(images, out / "samples.png", nrow=n if labels is not None else min(n, 8))
    np.save(out / "codes.npy", codes.numpy())
    label_array = labels.numpy() if labels is not None else np.full(len(codes), -1, dtype=np.int64)
    np.save(out / "labels.npy", label_array)
    summary = SampleSummary(
        prior=prior_ref, tokenizer=tokenizer_uri, device=str(dev),
        classes=None if labels is None else sorted(set(labels.tolist())), per_class=n, samples=len(codes),
        cfg_scale=options.cfg_scale, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
        seed=options.seed, steps=options.steps, codes_shape=list(codes.shape), png=str(png),
        codes=str(out / "codes.npy"), labels=str(out / "labels.npy"), seconds=round(seconds, 3),
        tokens_per_s=round(codes.numel() / max(seconds, 1e-9), 1),
    )
    if evaluate is not None:
        _evaluate(summary, images, labels, evaluate, dev, tracking_uri)
    return summary


def _evaluate(summary: SampleSummary, images: torch.Tensor, labels: torch.Tensor | None, spec: SampleEval,
              device: torch.device, tracking_uri: str | None) -> None:
    """The ADM .npz and/or the scores against the reference statistics, into `summary` (and MLflow)."""
    if spec.npz:
        summary.npz = {"path": spec.npz, "sha256": write_adm_npz(spec.npz, images, labels,
                                                                  spec.inception.storage_options)}
    if not spec.reference:
        return
    fields = {"cfg": summary.cfg_scale, "per_class": summary.per_class, "classes": summary.classes,
              "temperature": summary.temperature, "top_k": summary.top_k, "top_p": summary.top_p,
              "seed": summary.seed, "steps": summary.steps, "prior": summary.prior, "tokenizer": summary.tokenizer}
    summary.evaluation = score_samples(images, spec, fields, device)
    if tracking_uri:
        summary.mlflow_run_id = log_result_run(tracking_uri, "tokenmill-sample-eval", f"sample-eval-{summary.seed}",
                                               summary.evaluation["protocol"], summary.evaluation["metrics"],
                                               summary.to_json())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def load_prior(ref: str, device: torch.device, tracking_uri: str | None = None,
               storage_options: dict | None = None) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The prior (eval mode, on `device`) and its lineage (None when it has no lineage.json).
    Any prior kind (its config a `PriorConfig`: the AR prior, MaskGIT, VAR) samples through `prior.sample`."""
    files = resolve_reference(ref, tracking_uri, storage_options, extra_files=(LINEAGE_FILE,))
    prior = files.load(device)[0].eval()
    if not isinstance(getattr(prior, "config", None), PriorConfig):
        raise UserError(f"{ref} is a {type(prior).__name__}, not a Transformer prior; pass a model from "
                        "`tokenmill train-prior`")
    if LINEAGE_FILE not in files.extras:
        return prior, None
    lineage = parse_prior_lineage(files.extras[LINEAGE_FILE], ref)
    c = prior.config
    if lineage["vocab"] != c.vocab() or lineage["grid"] != c.grid:
        raise UserError(f"{ref}: {LINEAGE_FILE} (vocab {lineage['vocab']}, grid {lineage['grid']}) does not "
                        f"describe its model (vocab {c.vocab()}, grid {c.grid}); retrain or rewrite the lineage")
    return prior, lineage


def load_tokenizer(config: PriorConfig, lineage: dict[str, Any] | None, prior_ref: str, tokenizer_ref: str | None,
                   device: torch.device, tracking_uri: str | None = None,
                   storage_options: dict | None = None) -> tuple[torch.nn.Module, str, Any]:
    """The tokenizer that decodes the prior's codes, and where it came from: `tokenizer_ref` after a
    compatibility check, else the lineage's tokenizer (found as `pipeline.registry.resolver` says)
    after its sha256 check; and that `Resolved` (None for `tokenizer_ref`), to announce."""
    if tokenizer_ref is None:
        if lineage is None:
            raise UserError(f"{prior_ref} has no {LINEAGE_FILE} naming its tokenizer; pass one with --tokenizer")
        found = resolve_recorded(Recorded.of_prior(lineage), owner=prior_ref, tracking_uri=tracking_uri,
                                 storage_options=storage_options,
                                 fix="pass a compatible tokenizer with --tokenizer, or the registry that holds it "
                                     "with --tracking-uri")
        files, tokenizer_ref = found.files, found.where
    else:
        files, found = resolve_reference(tokenizer_ref, tracking_uri, storage_options), None
    tokenizer = files.load(device)[0].eval()
    check_tokenizer_fits(tokenizer, config, tokenizer_ref)
    return tokenizer, tokenizer_ref, found


def level_shapes(tokenizer: torch.nn.Module) -> list[tuple[int, ...]]:
    """The code shape of each level a tokenizer's `decode` takes: [(h, w)] or [(top), (bottom)]."""
    shape = getattr(tokenizer, "token_shape", None)
    if shape is None or not hasattr(tokenizer, "decode"):
        return []
    return [tuple(s) for s in shape] if isinstance(shape[0], (tuple, list)) else [tuple(shape)]


def check_tokenizer_fits(tokenizer: torch.nn.Module, config: PriorConfig, name: str) -> None:
    """UserError unless the tokenizer's codebook and per-level token shapes match the prior's
    vocabulary and grid (a level (h, w, S) fits the grid (h, w * S))."""
    shapes = level_shapes(tokenizer)
    if not shapes:
        raise UserError(f"{name} is a {type(tokenizer).__name__}, not a code tokenizer (no token_shape/decode)")
    size = getattr(tokenizer, "codebook_size", None)
    fits = size == config.codebook_size and len(shapes) == len(config.grid) and all(
        s[0] == h and math.prod(s) == h * w for s, (h, w) in zip(shapes, config.grid))
    if not fits:
        raise UserError(f"{name} does not fit this prior: its codebook has {size} codes and token shape "
                        f"{shapes}, the prior expects {config.codebook_size} codes on grid {config.grid}; "
                        "pass the tokenizer the prior's token store was made with")


def sample_labels(config: PriorConfig, classes: list[int] | None, n: int) -> torch.Tensor | None:
    """(len(classes) * n,) labels, each class n times in a row (None for an unconditional prior)."""
    if config.num_classes == 0:
        if classes:
            raise UserError("this prior is unconditional (trained without labels); drop --class")
        return None
    classes = list(range(config.num_classes)) if not classes else classes
    bad = [c for c in classes if not 0 <= c < config.num_classes]
    if bad:
        raise UserError(f"--class {bad[0]} is outside this prior's classes 0..{config.num_classes - 1}")
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(n)


def takes_steps(prior: torch.nn.Module) -> bool:
    """Whether the prior's `sample` takes `steps` (MaskGIT: parallel decoding)."""
    return "steps" in inspect.signature(prior.sample).parameters


def draw_codes(prior: torch.nn.Module, labels: torch.Tensor | None, options: SampleOptions,
               device: torch.device, n: int | None = None) -> torch.Tensor:
    """Codes (len(labels) or n, N) int64 on CPU, in batches of `options.batch_size`, from one seeded
    generator on `device`."""
    if options.cfg_scale != 1.0 and labels is None:
        raise UserError("--cfg needs a class-conditional prior")
    total = len(labels) if labels is not None else n
    steps = {} if options.steps is None else {"steps": options.steps}
    generator = torch.Generator(device=device).manual_seed(options.seed)
    batches = []
    for start in range(0, total, options.batch_size):
        rows = min(options.batch_size, total - start)
        batch_labels = None if labels is None else labels[start : start + rows].to(device)
        codes = prior.sample(rows, batch_labels, cfg_scale=options.cfg_scale, temperature=options.temperature,
                             top_k=options.top_k, top_p=options.top_p, generator=generator, **steps)
        batches.append(codes.cpu())
    return torch.cat(batches)


@torch.no_grad()
def codes_to_images(tokenizer: torch.nn.Module, codes: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
    """Flat codes (n, N) in store order -> images (n, C, H, W) in [0, 1] on CPU, decoded in batches."""
    shapes = level_shapes(tokenizer)
    device = next(tokenizer.parameters()).device
    sizes = [h * w for h, w in grid]
    images = []
    for batch in codes.split(DECODE_BATCH):
        levels = [part.reshape(len(batch), *shape).to(device) for part, shape in zip(batch.split(sizes, 1), shapes)]
        decoded = tokenizer.decode(levels[0] if len(levels) == 1 else tuple(levels))
        images.append(decoded.float().cpu())
    return torch.cat(images)
