"""The metric formulas on fixed features: the Frechet distance equals scipy's `sqrtm` formula,
precision/recall equal a brute-force count, and FID, IS and precision/recall equal torch-fidelity's
own functions (imported as in tests/unit/test_inception.py)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers.inception import reference_torch_fidelity

from tokenmill.models.inception_metrics import FeatureStats, frechet_distance, inception_score, precision_recall


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_frechet_distance_equals_scipys_sqrtm_formula():
    a, b = _features(300, 64, seed=0), _features(200, 64, seed=1, shift=0.5)
    stats_a, stats_b = FeatureStats.of(torch.from_numpy(a)), FeatureStats.of(torch.from_numpy(b))
    assert frechet_distance(stats_a, stats_b) == pytest.approx(_scipy_fid(a, b), abs=1e-6)
    assert frechet_distance(stats_a, stats_b) > 1.0 and abs(frechet_distance(stats_a, stats_a)) < 1e-6
    assert torch.allclose(stats_a.sigma, torch.from_numpy(np.cov(a, rowvar=False)), atol=1e-12)


def _brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    def dist(p, q):
        return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1))

    def radii(x):
        return np.array([sorted(row)[k] for row in dist(x, x)])  # row[0] is the point itself

    r_real, r_fake = radii(real), radii(fake)
    precision = np.mean([any(np.linalg.norm(f - r) <= rad for r, rad in zip(real, r_real)) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - f) <= rad for f, rad in zip(fake, r_fake)) for r in real])
    return float(precision), float(recall)


def test_precision_recall_equal_a_brute_force_count():
    real, fake = _features(40, 8, seed=2), _features(30, 8, seed=3, shift=0.4)
    ours = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), batch=7)  # batches do not change it
    assert ours == pytest.approx(_brute_force_pr(real, fake), abs=1e-12)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1  # neither trivially 0 nor 1
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(real)) == (1.0, 1.0)


def test_fid_is_and_pr_equal_torch_fidelitys_functions(monkeypatch):
    fidelity = reference_torch_fidelity(monkeypatch)
    a, b = _features(120, 32, seed=4), _features(100, 32, seed=5, shift=0.2)
    stats = [fidelity.metric_fid.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    expected = fidelity.metric_fid.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(FeatureStats.of(torch.from_numpy(a)), FeatureStats.of(torch.from_numpy(b)))
    assert ours == pytest.approx(expected, abs=1e-9)

    logits = torch.from_numpy(_features(95, 20, seed=6) * 5).float()
    expected_is = fidelity.metric_isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    order = torch.from_numpy(np.random.RandomState(2020).permutation(95))
    mean, std = inception_score(logits, splits=10, order=order)
    assert (mean, std) == pytest.approx((expected_is["inception_score_mean"], expected_is["inception_score_std"]),
                                        rel=1e-12)
    assert mean > 1.5

    real, fake = torch.from_numpy(a), torch.from_numpy(b)  # torch-fidelity: features_1 generated, features_2 real
    assert precision_recall(real, fake) == pytest.approx(
        fidelity.metric_prc.calculate_precision_recall_full(fake, real, 3, 10000), rel=1e-6)  # its mean is float32
