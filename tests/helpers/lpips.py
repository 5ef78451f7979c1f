"""Random LPIPS weights in the two published file formats (torchvision's VGG16 state dict, lpips'
linear heads) and the VGG16 `features` stand-in that gives their shapes; tests/unit/test_lpips.py
also builds the reference lpips package over the stand-in."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VGG16_CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16Shim(nn.Module):
    """torchvision.models.vgg16's `features` (cfg "D", no batch norm); the classifier is not needed."""

    def __init__(self, pretrained: bool = False, **_: object) -> None:
        super().__init__()
        layers, channels = [], 3
        for v in VGG16_CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)


def write_random_lpips_weights(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """Random weights in both published formats: torchvision's VGG16 state dict (features only)
    and lpips' linear heads. Returns (vgg path, lin path)."""
    generator = torch.Generator().manual_seed(seed)
    vgg = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in VGG16Shim().state_dict().items()}
    vgg = {f"features.{k.split('.', 1)[1]}": v for k, v in vgg.items()}
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
           for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, directory / "vgg.pth")
    torch.save(lin, directory / "lin.pth")
    return directory / "vgg.pth", directory / "lin.pth"
