"""Shared convolutional building blocks: residual blocks and down/up-sampling stacks."""

from __future__ import annotations

import math

from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), channels unchanged (VQ-VAE style)."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or channels // 2
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _halvings(factor: int) -> int:
    steps = int(math.log2(factor))
    if factor < 2 or 2**steps != factor:
        raise ValueError(f"resampling factor must be a power of two >= 2, got {factor}")
    return steps


def downsample(in_channels: int, channels: int, factor: int) -> nn.Sequential:
    """log2(factor) stride-2 4x4 convs: (B, in, H, W) -> (B, channels, H/f, W/f)."""
    layers: list[nn.Module] = []
    for i in range(_halvings(factor)):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 4, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def upsample(channels: int, out_channels: int, factor: int) -> nn.Sequential:
    """log2(factor) stride-2 4x4 transposed convs: (B, channels, h, w) -> (B, out, h*f, w*f)."""
    steps = _halvings(factor)
    layers: list[nn.Module] = []
    for i in range(steps):
        last = i == steps - 1
        layers.append(nn.ConvTranspose2d(channels, out_channels if last else channels, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def conv_encoder(in_channels: int, hidden: int, out_channels: int, factor: int, res_blocks: int) -> nn.Sequential:
    """(B, in, H, W) -> (B, out, H/f, W/f): downsampling, residual blocks, 1x1 projection."""
    return nn.Sequential(
        downsample(in_channels, hidden, factor),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        *(ResidualBlock(hidden) for _ in range(res_blocks)),
        nn.ReLU(),
        nn.Conv2d(hidden, out_channels, 1),
    )


def conv_decoder(in_channels: int, hidden: int, out_channels: int, factor: int, res_blocks: int) -> nn.Sequential:
    """(B, in, h, w) -> (B, out, h*f, w*f): 3x3 projection, residual blocks, upsampling."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        *(ResidualBlock(hidden) for _ in range(res_blocks)),
        nn.ReLU(),
        upsample(hidden, out_channels, factor),
    )
