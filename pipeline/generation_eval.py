"""Inception metrics under a pinned protocol: rFID (`tokenmill eval`), reference statistics
(`tokenmill fid-stats`), gFID / Inception Score / precision-recall (`tokenmill sample --eval`).

The evaluator is `models.inception.FIDInceptionV3` (torch-fidelity's FID Inception, equal to it
given the same weights) with torch-fidelity's weights file, read from a local path or any fsspec
URL (never downloaded from the internet here), its sha256 checked against the published prefix
(or the one the user names) and recorded. Every result carries `inception_protocol(...)`: the
resolution, resize filter, crop, split, N, CFG, evaluator and weights sha256 that produced it.
Without the weights each Inception metric is "unavailable: <which file goes where>".

Reference statistics are one `.npz` (written byte-identically for identical inputs): `mu` (2048,)
and `sigma` (2048, 2048) float64, `features` (N, 2048) float32 (precision/recall needs the points),
`protocol` (the protocol as JSON text). No pickles: it is read with allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.models.inception import (
    INCEPTION_FILE,
    INCEPTION_SHA256_PREFIX,
    INCEPTION_URL,
    FIDInceptionV3,
    load_inception,
)
from tokenmill.models.inception_metrics import (
    IS_SPLITS,
    PR_NEIGHBOURS,
    FeatureStats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from tokenmill.pipeline.runtime.storage import filesystem

PROTOCOL_VERSION = "tokenmill-inception/1"
EVALUATOR = ("tokenmill.models.inception.FIDInceptionV3 = torch-fidelity 0.4 'inception-v3-compat' "
             "(TF Inception 2015-12-05): pool 2048 for FID and precision/recall, unbiased logits for IS")
INCEPTION_INPUT = ("uint8 RGB -> TF-1 bilinear resize to 299x299 (align_corners=False) -> (x - 128) / 128; "
                   "float32 throughout (TF32 off on CUDA)")
TO_UINT8 = "images in [0, 1] -> round(x * 255); grey replicated to 3 channels"
FORMULAS = {
    "fid": "|mu_a - mu_b|^2 + tr(S_a + S_b) - 2 sum sqrt(eig(S_a S_b)), float64 (TTUR / torch-fidelity)",
    "inception_score": f"torch-fidelity: {IS_SPLITS} splits after a numpy RandomState(2020) shuffle; mean, std",
    "precision_recall": f"Kynkaanniemi et al. 2019, k = {PR_NEIGHBOURS}, Euclidean in float64",
}


@dataclass
class InceptionWeights:
    """Where torch-fidelity's Inception weights are, and the sha256 they must have."""

    path: str | None = None  # local path or fsspec URL; None: <torch hub>/checkpoints/INCEPTION_FILE
    sha256: str | None = None  # expected sha256 or a prefix of it; None: the published file's
    storage_options: dict[str, Any] = field(default_factory=dict)

    def location(self) -> str:
        from tokenmill.models.lpips import hub_checkpoints

        return self.path or str(hub_checkpoints() / INCEPTION_FILE)


@dataclass
class Evaluator:
    """The loaded extractor and what identifies its weights (`weights` goes into every result)."""

    model: FIDInceptionV3
    weights: dict[str, str]  # path, sha256, published ("true"/"false")
    batch_size: int = 50

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W), float in [0, 1] or uint8 -> pool (B, 2048), logits (B, 1008), float32 on CPU."""
        x = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        device = next(self.model.parameters()).device
        with full_float32():
            parts = [self.model(chunk.to(device)) for chunk in x.split(self.batch_size)]
        return torch.cat([p for p, _ in parts]).cpu(), torch.cat([lg for _, lg in parts]).cpu()


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for the block (cuDNN allows it by default: ~1e-3 relative error in the convolutions
    on CUDA, and features that depend on the GPU); restored after. No effect on CPU."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def missing_inception(weights: InceptionWeights) -> str | None:
    """None when the weights file exists, else one sentence saying which file goes where."""
    where = weights.location()
    fs, path = filesystem(where, weights.storage_options)
    if fs.exists(path):
        return None
    return (f"the Inception metrics need torch-fidelity's FID Inception weights: put {INCEPTION_FILE} "
            f"(published at {INCEPTION_URL}) at {where}, or name a path or URL with --inception")


def load_evaluator(weights: InceptionWeights, device: str | torch.device = "cpu") -> Evaluator:
    """The extractor on `device`; UserError when the file is missing, has another sha256, or holds other weights."""
    problem = missing_inception(weights)
    if problem:
        raise UserError(problem)
    where = weights.location()
    fs, path = filesystem(where, weights.storage_options)
    data = fs.cat_file(path)
    found = hashlib.sha256(data).hexdigest()
    expected = (weights.sha256 or INCEPTION_SHA256_PREFIX).lower()
    if not found.startswith(expected):
        hint = ("replace the file, or pass --inception-sha256 " + found + " to use these weights knowingly"
                if weights.sha256 is None else "replace the file or correct --inception-sha256")
        raise UserError(f"{where} has sha256 {found[:16]}…, expected {expected[:16]}…; {hint}")
    model = load_inception(io.BytesIO(data), map_location=device, name=where)
    published = str(found.startswith(INCEPTION_SHA256_PREFIX)).lower()
    return Evaluator(model, {"path": where, "sha256": found, "published": published})


def evaluator_or_unavailable(weights: InceptionWeights, device: str | torch.device = "cpu") -> Evaluator | str:
    """The evaluator, or "unavailable: …" when its weights file is absent (a wrong file is still a UserError)."""
    problem = missing_inception(weights)
    return f"unavailable: {problem}" if problem else load_evaluator(weights, device)


def inception_protocol(evaluator: Evaluator | str, **fields: Any) -> dict[str, Any]:
    """The pinned protocol: how images reach the Inception and which weights it ran with, plus
    `fields` (resolution, resize_filter, crop, split, n, cfg, ...) from the caller."""
    return {"version": PROTOCOL_VERSION, "evaluator": EVALUATOR, "inception_input": INCEPTION_INPUT,
            "to_uint8": TO_UINT8, **FORMULAS,
            "inception_weights_sha256": evaluator.weights["sha256"] if isinstance(evaluator, Evaluator) else None,
            **fields}


# -- reference statistics files ----------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    stats: FeatureStats
    features: torch.Tensor  # (N, 2048) float32
    protocol: dict[str, Any]
    sha256: str  # of the file


def write_npz(url: str, arrays: dict[str, np.ndarray], storage_options: dict | None = None) -> str:
    """An `.npz` numpy reads (np.load), byte-identical for identical arrays (fixed zip timestamps,
    unlike np.savez); returns its sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    data = buffer.getvalue()
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return hashlib.sha256(data).hexdigest()


def write_reference(url: str, features: torch.Tensor, protocol: dict[str, Any],
                    storage_options: dict | None = None) -> str:
    """features (N, 2048) -> the reference file at `url` (any fsspec URL); returns its sha256."""
    stats = FeatureStats.of(features)
    return write_npz(url, {"mu": stats.mu.numpy(), "sigma": stats.sigma.numpy(),
                           "features": features.float().numpy(), "protocol": np.array(json.dumps(protocol))},
                     storage_options)


def read_reference(url: str, storage_options: dict | None = None) -> Reference:
    """A file from `tokenmill fid-stats`; UserError when it is absent or not one."""
    fs, path = filesystem(url, storage_options)
    if not fs.exists(path):
        raise UserError(f"reference statistics {url} do not exist; make them with "
                        "`tokenmill fid-stats SHARDS --split val --out REF.npz`")
    data = fs.cat_file(path)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            mu, sigma, features = npz["mu"], npz["sigma"], npz["features"]
            protocol = json.loads(str(npz["protocol"]))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{url} is not a tokenmill reference statistics file (mu, sigma, features, protocol): "
                        f"{err}") from None
    stats = FeatureStats(torch.from_numpy(mu), torch.from_numpy(sigma), int(features.shape[0]))
    return Reference(stats, torch.from_numpy(features), protocol, hashlib.sha256(data).hexdigest())


def write_adm_npz(url: str, images: torch.Tensor, labels: torch.Tensor | None,
                  storage_options: dict | None = None) -> str:
    """Samples as the ADM evaluator (guided-diffusion/evaluations) reads them: `arr_0` uint8
    (N, H, W, 3) and, when class-conditional, `arr_1` the labels (as ADM's sampler writes)."""
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)  # (N, C, H, W), the same rounding as TO_UINT8
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    arrays = {"arr_0": x.permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    return write_npz(url, arrays, storage_options)



def log_result_run(tracking_uri: str, experiment: str, run_name: str, protocol: dict[str, Any],
                   metrics: dict[str, float], result: dict[str, Any]) -> str:
    """One finished MLflow run: the protocol as `protocol.*` params, the finite metrics, and the
    whole result as result.json. Returns the run id. (Through a client: nothing global is set.)"""
    import math
    import time

    from mlflow.entities import Metric, Param

    from tokenmill.pipeline.registry.tracking import client, flatten

    mlflow = client(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)
    run_id = mlflow.create_run(experiment_id, run_name=run_name).info.run_id
    now = int(time.time() * 1000)
    mlflow.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(protocol, "protocol.").items()],
                     metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if math.isfinite(v)])
    mlflow.log_dict(run_id, result, "result.json")
    mlflow.set_terminated(run_id)
    return run_id


# -- scoring samples against reference statistics (`tokenmill sample --eval`) ---------------------

@dataclass
class SampleEval:
    reference: str | None = None  # REF.npz from `tokenmill fid-stats` to score the samples against
    npz: str | None = None  # also write the samples here as the ADM evaluator's .npz
    inception: InceptionWeights = field(default_factory=InceptionWeights)


def score_samples(images: torch.Tensor, spec: SampleEval, fields: dict[str, Any],
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """gFID, Inception Score, precision and recall of images (N, C, H, W) in [0, 1] against
    `spec.reference`, with the protocol (`fields`: cfg, per_class, seed, ...). Each metric the
    evaluator cannot give is "unavailable: why" under `unavailable`. UserError when the reference
    is absent or was made at another resolution or with other Inception weights."""
    reference = read_reference(spec.reference, spec.inception.storage_options)
    resolution = images.shape[-1]
    if reference.protocol.get("resolution") != resolution:
        raise UserError(f"{spec.reference} was computed at {reference.protocol.get('resolution')} px and the "
                        f"samples are {resolution} px; rerun `tokenmill fid-stats … --resolution {resolution}`")
    evaluator = evaluator_or_unavailable(spec.inception, device)
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if isinstance(evaluator, str):
        unavailable = dict.fromkeys(("gfid", "inception_score", "precision", "recall"), evaluator)
    else:
        if reference.protocol.get("inception_weights_sha256") != evaluator.weights["sha256"]:
            raise UserError(f"{spec.reference} was made with Inception weights of sha256 "
                            f"{str(reference.protocol.get('inception_weights_sha256'))[:16]}…, these are "
                            f"{evaluator.weights['sha256'][:16]}…; score with the same weights")
        pool, logits = evaluator.features(images)  # (N, 2048), (N, 1008)
        metrics, unavailable = _sample_metrics(pool, logits, reference, device)
    protocol = inception_protocol(
        evaluator, resolution=resolution, resize_filter="none: samples are scored at the tokenizer's resolution",
        crop="none", split=reference.protocol.get("split"), n=len(images), **fields,
        reference={"path": spec.reference, "sha256": reference.sha256, "n": reference.stats.n,
                   "protocol": reference.protocol})
    return {"metrics": metrics, "unavailable": unavailable, "protocol": protocol,
            "inception": evaluator if isinstance(evaluator, str) else evaluator.weights}


def _sample_metrics(pool: torch.Tensor, logits: torch.Tensor, reference: Reference,
                    device: str | torch.device) -> tuple[dict[str, float], dict[str, str]]:
    n = len(pool)
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    if n >= 2:
        metrics["gfid"] = frechet_distance(reference.stats, FeatureStats.of(pool))
    else:
        unavailable["gfid"] = f"unavailable: {n} sample; a Frechet distance needs at least 2"
    if n >= IS_SPLITS:
        order = torch.from_numpy(np.random.RandomState(2020).permutation(n))  # torch-fidelity's shuffle
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, IS_SPLITS, order)
    else:
        unavailable["inception_score"] = f"unavailable: {n} samples; {IS_SPLITS} splits need at least {IS_SPLITS}"
    if min(n, reference.stats.n) > PR_NEIGHBOURS:
        # O(N M D) distances: on the sampling device (50k x 50k x 2048 is minutes on a GPU, hours on a CPU)
        metrics["precision"], metrics["recall"] = precision_recall(reference.features.to(device), pool.to(device))
    else:
        why = f"unavailable: k = {PR_NEIGHBOURS} needs more than {PR_NEIGHBOURS} samples and reference images"
        unavailable |= {"precision": why, "recall": why}
    return metrics, unavailable
