"""Random weights for FID's Inception in torch-fidelity's file format (the state dict of
`FeatureExtractorInceptionV3`, as `weights-inception-2015-12-05-6726825d.pth` holds it), and the
reference torch_fidelity package (from the environment's `references/` folder, see REFERENCES) imported
over a stand-in torchvision when the real one is absent."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

# make setup installs torch-fidelity here, off sys.path: installed in the environment it would make
# torchmetrics import it (and its missing torchvision) for every image metric, skipping the SSIM test.
REFERENCES = Path(sys.prefix) / "references"


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """He-scaled random convolutions and batch-norm statistics near identity, so features stay O(1)
    through 94 layers (with all-random statistics they vanish or explode, and equality would be
    checked on zeros or infinities)."""
    from tokenmill.models.inception import FIDInceptionV3

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("conv.weight") or key == "fc.weight":
            fan_in = math.prod(value.shape[1:])
            state[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        else:  # running_mean, bn.bias, fc.bias
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    torch.save(state, path)
    return path


def reference_torch_fidelity(monkeypatch):
    """The torch_fidelity package: the real one, or its unmodified source imported over a stand-in
    `torchvision` (it imports torchvision's datasets and transforms at import time, and uses none of
    them for the Inception features or the metric formulas). Skips when torch-fidelity is absent."""
    monkeypatch.syspath_prepend(str(REFERENCES))
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip(f"torch-fidelity is not in {REFERENCES} (make setup puts it there with --no-deps)")
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("torch_fidelity")
    stand_in = {name: types.ModuleType(name) for name in
                ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.models")}
    for name in ("CIFAR10", "STL10", "CIFAR100"):
        setattr(stand_in["torchvision.datasets"], name, type(name, (), {}))
    for name, module in stand_in.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_in[parent], child, module)
        monkeypatch.setitem(sys.modules, name, module)
    module = importlib.import_module("torch_fidelity")
    for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
        sys.modules.pop(name)  # not restored after the test: nothing else sees a package built on the stand-in
    return module
