"""Numeric precision of a training run: which autocast dtype, and TF32 on CUDA.

`train.precision: auto` (the default) is bf16 on a CUDA device that supports it (fp16 on older
GPUs) and fp32 on the CPU; fp32, bf16 or fp16 force a choice (bf16 on the CPU works, slowly: the
unit tests use it). Autocast covers the forward only (`pipeline.training.step`); fp16 adds one
GradScaler for every optimizer of the step. Quantizer distances and codebook statistics stay
fp32 whatever this says (`models.quantizers`).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(setting: str, device: torch.device) -> str:
    """`setting` (a Precision) on `device` -> "fp32", "bf16" or "fp16"."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's autocast for a resolved `precision` (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def configure_device_math(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later: ~8x the fp32 rate, a
    10-bit mantissa that training does not notice); nothing changes on the CPU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
