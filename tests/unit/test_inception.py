"""tokenmill.models.inception.FIDInceptionV3 equals torch-fidelity's `FeatureExtractorInceptionV3`
("inception-v3-compat") given identical weights: the 2048-d pool features (FID, precision/recall)
and the unbiased logits (Inception Score), including torch-fidelity's own TF-1 bilinear resize to
299 and its (x - 128) / 128 normalisation.

torch-fidelity imports torchvision's datasets and transforms at import time, and torchvision cannot
be installed on CPU-only machines here; its unmodified source is then imported over a stand-in
torchvision (tests/helpers/inception.py), which the Inception path never touches. `make setup`
installs torch-fidelity with --no-deps; without it the comparison is skipped. The weights are
random, saved in torch-fidelity's file format (its state dict), and loaded by both from that file.
Inputs are 2 images (32 x 48, so the resize upsamples; the resize alone is compared both ways): Inception at 299 px costs ~0.4 s per image on one CPU thread."""

from __future__ import annotations

import pytest
import torch
from helpers.inception import reference_torch_fidelity

from tokenmill.models.errors import UserError
from tokenmill.models.inception import FIDInceptionV3, load_inception, resize_like_tf1


def test_features_and_logits_equal_torch_fidelitys_with_identical_weights(inception_weights, monkeypatch, one_thread):
    weights = inception_weights[0]
    fidelity = reference_torch_fidelity(monkeypatch)
    reference = fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
    ours = load_inception(weights)
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool, logits = ours(images)
    ref_pool, ref_logits = reference(images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.allclose(pool, ref_pool, rtol=0, atol=1e-5), (pool - ref_pool).abs().max()
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-5), (logits - ref_logits).abs().max()
    assert pool.std() > 0.1 and not torch.allclose(pool[0], pool[1])  # not a degenerate comparison


def test_the_resize_equals_torch_fidelitys_own_implementation(monkeypatch):
    fidelity = reference_torch_fidelity(monkeypatch)
    from_tf = fidelity.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x
    for size in ((37, 64), (310, 401)):  # up- and downsampled, non-square
        x = torch.randint(0, 256, (1, 3, *size)).float()
        expected = from_tf(x, size=(299, 299), align_corners=False)
        assert torch.equal(resize_like_tf1(x), expected)
        assert not torch.allclose(expected, torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear"))


def test_a_file_of_other_weights_is_one_user_error(tmp_path):
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="does not hold torch-fidelity's FID Inception"):
        load_inception(tmp_path / "vgg.pth")
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match="does not hold"):
        load_inception(tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match="uint8"):
        FIDInceptionV3()(torch.zeros(1, 3, 8, 8))
