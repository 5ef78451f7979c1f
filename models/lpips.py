"""LPIPS (Zhang et al. 2018, VGG variant v0.1) in plain torch: torchvision's VGG16 `features`
stack plus the lpips package's five linear heads, computed exactly as `lpips.LPIPS(net="vgg")`
(tests/unit/test_lpips.py compares the two given identical weights).

This module never downloads: it reads two local files, each checked against its sha256 (a URL in
vgg_path / lin_path, s3:// or https://, is first fetched and checked by pipeline.runtime.weights):
  vgg  torchvision's ImageNet VGG16 checkpoint `vgg16-397923af.pth`, by default in the torch hub
       cache (`torch.hub.get_dir()/checkpoints`, where torchvision would have put it);
  lin  lpips' linear heads `lpips/weights/v0.1/vgg.pth` (inside the lpips wheel), by default the
       installed lpips package's copy, else `<hub>/checkpoints/lpips_vgg_v0.1.pth`.
`resolve_lpips_weights` finds them or raises one UserError naming the file and where to put it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from tokenmill.models.errors import UserError
from tokenmill.models.ranges import STRICT
from tokenmill.models.serialization import file_sha256

VGG_FILE = "vgg16-397923af.pth"
LIN_FILE = "lpips_vgg_v0.1.pth"
VGG_SHA256 = "397923af"  # torchvision publishes a prefix (the file name's), which torch.hub checks the same way
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)  # features index after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)


@dataclass
class LPIPSWeights:
    """Where the two weight files are (None: the default places above)."""

    # Local paths or, through pipeline.runtime.weights, any fsspec URL (s3://, https://).
    vgg_path: Optional[str] = None
    lin_path: Optional[str] = None
    verify_sha256: bool = True  # False accepts other weights (tests use random ones); hashes are still recorded
    # The expected sha256 of each file (None: the published weights'); always checked when set.
    vgg_sha256: Optional[str] = None
    lin_sha256: Optional[str] = None

    __pydantic_config__ = STRICT


@dataclass(frozen=True)
class ResolvedWeights:
    vgg_path: Path
    lin_path: Path
    vgg_sha256: str
    lin_sha256: str

    def describe(self) -> dict[str, str]:
        return {"vgg": str(self.vgg_path), "vgg_sha256": self.vgg_sha256,
                "lin": str(self.lin_path), "lin_sha256": self.lin_sha256}


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _default_lin_path() -> Path:
    spec = importlib.util.find_spec("lpips")  # finds the package without importing it (it needs torchvision)
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
        if packaged.is_file():
            return packaged
    return hub_checkpoints() / LIN_FILE


def missing_weights(config: LPIPSWeights) -> str | None:
    """None when both files exist, else one sentence saying which file to put where."""
    vgg = Path(config.vgg_path) if config.vgg_path else hub_checkpoints() / VGG_FILE
    lin = Path(config.lin_path) if config.lin_path else _default_lin_path()
    if not vgg.is_file():
        return (f"LPIPS needs torchvision's VGG16 ImageNet weights: put {VGG_FILE} at {vgg} "
                "(or name it: loss.perceptual.vgg_path in a train config, --lpips-vgg for eval)")
    if not lin.is_file():
        return (f"LPIPS needs lpips' linear heads: copy lpips/weights/v0.1/vgg.pth from the lpips wheel "
                f"(pip download lpips --no-deps) to {lin} (or name it: loss.perceptual.lin_path, --lpips-lin)")
    return None


def resolve_lpips_weights(config: LPIPSWeights) -> ResolvedWeights:
    """Both files with their sha256; UserError when one is missing or (verify_sha256) not the published one."""
    problem = missing_weights(config)
    if problem:
        raise UserError(problem)
    vgg = Path(config.vgg_path) if config.vgg_path else hub_checkpoints() / VGG_FILE
    lin = Path(config.lin_path) if config.lin_path else _default_lin_path()
    resolved = ResolvedWeights(vgg, lin, file_sha256(vgg), file_sha256(lin))
    for path, found, configured, published in ((vgg, resolved.vgg_sha256, config.vgg_sha256, VGG_SHA256),
                                               (lin, resolved.lin_sha256, config.lin_sha256, LIN_SHA256)):
        if configured and not found.startswith(configured.lower()):
            raise UserError(f"{path} has sha256 {found[:16]}…, not the configured {configured[:16]}…; "
                            "replace the file, or fix the expected sha256 next to its path")
        if config.verify_sha256 and not configured and not found.startswith(published):
            raise UserError(f"{path} has sha256 {found[:16]}…, not the published {published[:16]}…; "
                            "replace the file, or set verify_sha256: false to use these weights knowingly")
    return resolved


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features`: the same modules at the same indices (so its keys load)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """`forward(a, b)` for images in [-1, 1], (B, 3, H, W) each -> (B,) distances. Frozen, eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        self.features = vgg16_features()[: TAPS[-1] + 1]  # the last max-pool is never used
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, weights: ResolvedWeights) -> "LPIPS":
        model = cls()
        vgg = torch.load(weights.vgg_path, map_location="cpu", weights_only=True)
        lin = torch.load(weights.lin_path, map_location="cpu", weights_only=True)  # saved from CUDA
        state = {k: v for k, v in vgg.items() if k.startswith("features.") and int(k.split(".")[1]) <= TAPS[-1]}
        state |= {f"lins.{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(TAP_CHANNELS))}
        state |= {"shift": model.shift, "scale": model.scale}
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError) as err:
            raise UserError(f"{weights.vgg_path} / {weights.lin_path} do not hold VGG16 + LPIPS weights ({err})") from None
        return model

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: the reference runs it in eval mode

    def _taps(self, x: Tensor) -> list[Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
        return taps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        taps_a, taps_b = self._taps((a - self.shift) / self.scale), self._taps((b - self.shift) / self.scale)
        total: Tensor | int = 0
        for lin, fa, fb in zip(self.lins, taps_a, taps_b):
            diff = (_unit(fa) - _unit(fb)) ** 2  # (B, C, h, w)
            total = total + lin(diff).mean([2, 3], keepdim=True)  # (B, 1, 1, 1)
        return total.flatten()


def _unit(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit length along channels, as lpips.normalize_tensor."""
    return features / (torch.sqrt(torch.sum(features**2, dim=1, keepdim=True)) + eps)
