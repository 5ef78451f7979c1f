"""tokenmill.models.lpips.LPIPS equals the lpips package's `lpips.LPIPS(net="vgg")` given identical weights.

lpips needs torchvision only for `torchvision.models.vgg16(...).features`, and torchvision cannot
be installed on CPU-only machines here (its wheel is CUDA-linked). So when `import lpips` fails for
want of torchvision, lpips' own, unmodified source is imported with a stand-in `torchvision` in
sys.modules whose `models.vgg16` builds the standard VGG16 `features` Sequential (written out in
tests/helpers/lpips.py from torchvision's definition, not taken from models.lpips). `make setup`
installs lpips with `--no-deps` for this; without lpips at all the comparison is skipped. Weights are random, in the
two published file formats (torchvision state dict; lpips' `lin{i}.model.1.weight`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from helpers.lpips import VGG16Shim, write_random_lpips_weights

from tokenmill.models.errors import UserError
from tokenmill.models.lpips import LIN_SHA256, LPIPS, LPIPSWeights, resolve_lpips_weights


def _reference_lpips(monkeypatch):
    """The lpips module: the real one, or its source imported over the torchvision stand-in."""
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("lpips is not installed (make setup installs it with --no-deps)")
    try:
        return importlib.import_module("lpips")
    except ImportError:
        pass
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.ModuleType("torchvision.models")
    torchvision.models.vgg16 = VGG16Shim
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)
    monkeypatch.setitem(sys.modules, "torchvision.models", torchvision.models)
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("lpips")
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)  # undone again: other tests see no lpips built on the stand-in
    return module


def test_lpips_equals_the_reference_with_identical_weights(tmp_path, monkeypatch):
    vgg_path, lin_path = write_random_lpips_weights(tmp_path)
    weights = resolve_lpips_weights(LPIPSWeights(str(vgg_path), str(lin_path), verify_sha256=False))
    ours = LPIPS.from_files(weights)

    lpips = _reference_lpips(monkeypatch)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, model_path=str(lin_path), verbose=False)
    features = torch.load(vgg_path, weights_only=True)
    reference.net.load_state_dict({f"slice{s}.{i}.{k.split('.')[2]}": v for k, v in features.items()
                                   for s, (lo, hi) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], 1)
                                   if lo <= (i := int(k.split(".")[1])) < hi})

    a, b = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    expected = reference(a, b).flatten()
    assert torch.equal(ours(a, b), expected), (ours(a, b), expected)
    assert torch.all(ours(a, a) == 0) and torch.all(expected > 0)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())


def test_missing_or_foreign_weights_name_the_file(tmp_path):
    vgg_path, lin_path = write_random_lpips_weights(tmp_path)
    with pytest.raises(UserError, match="vgg16-397923af.pth at .*absent"):
        resolve_lpips_weights(LPIPSWeights(str(tmp_path / "absent" / "vgg.pth"), str(lin_path)))
    with pytest.raises(UserError, match="not the published"):
        resolve_lpips_weights(LPIPSWeights(str(vgg_path), str(lin_path)))  # random weights, sha256 checked


def test_the_installed_lpips_packages_heads_are_found_and_verified(tmp_path):
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("lpips is not installed (make setup installs it with --no-deps)")
    vgg_path, _ = write_random_lpips_weights(tmp_path)
    found = resolve_lpips_weights(LPIPSWeights(str(vgg_path), verify_sha256=False))
    assert found.lin_path.parts[-3:] == ("weights", "v0.1", "vgg.pth") and found.lin_sha256 == LIN_SHA256
    assert LPIPS.from_files(found).lins[0].weight.shape == (1, 64, 1, 1)  # the published heads load
