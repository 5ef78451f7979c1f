"""A saved model, loaded once for inference, that turns uint8 image batches into store rows.

VQ family (`encode(x) -> codes (B, h, w)` or a tuple of them per level): rows of codes, one
array per level (`codes`, or `codes_0`, `codes_1`, ... in the order `encode` returns them; for
VQ-VAE-2 that is top, bottom; for a multi-scale (VAR) quantizer its scales, coarse to fine). VAE family with `latents=True` (`encode(x, y) -> (μ, log σ²)`):
posterior means as float16 (`latents`, or `latents_<group>` per group of a hierarchical VAE,
see `pipeline.tokens.latent_groups`). Shapes come from encoding one blank image, so every
model that honours the contract works without per-class code here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.registry.model_ref import ModelFiles
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.tokens.latent_groups import latent_names, split_latents
from tokenmill.pipeline.tokens.store_format import ArraySpec, codes_dtype
from tokenmill.pipeline.training.precision import AUTOCAST_DTYPES, autocast  # torch only: no Ray here


def model_transform(meta: dict[str, Any]) -> TransformConfig:
    """How images must look for this model: the transform saved with it (`extra.transform`),
    else its config's image size and channels with a center crop."""
    saved = meta.get("extra", {}).get("transform")
    if saved:
        return TransformConfig.model_validate(saved)
    config = meta["config"]
    channels = config.get("channels", config.get("in_channels", 3))  # VAE vs VQ config field names
    return TransformConfig(size=config.get("image_size", 32), channels=channels)


def check_precision(precision: str) -> None:
    if precision not in AUTOCAST_DTYPES:
        raise UserError(f"--precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")


def inference_layout(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` as inference on `device` wants it: channels_last on CUDA (cuDNN's fastest
    convolutions under autocast take NHWC); unchanged on the CPU."""
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto `device`: on CUDA from pinned memory, without blocking (send uint8
    images: 4x fewer bytes than float)."""
    return batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)


def to_host(outputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Device outputs -> CPU tensors: non-blocking copies, then one wait for all of them."""
    cuda = device.type == "cuda"
    host = [out.to("cpu", non_blocking=cuda) for out in outputs]
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    return host


class TokenEncoder:
    """`encode(images uint8 (B, H, W, C), labels int64 (B,))` -> {array name: numpy rows}.

    `precision` bf16/fp16 runs the encoder under autocast; quantizers compute distances and
    pick codes in fp32 whatever the autocast (as in training). On CUDA the model and inputs are
    channels_last and batches travel from pinned memory with non-blocking copies."""

    def __init__(self, files: ModelFiles, latents: bool, device: str = "cpu", precision: str = "fp32"):
        check_precision(precision)
        # Training exports EMA weights as *the* model, so loading it is loading EMA weights.
        model, self.meta = files.load(map_location=device)
        self.model = model.eval().requires_grad_(False)
        self.device, self.latents, self.precision = torch.device(device), latents, precision
        self.model = inference_layout(self.model, self.device)
        if latents and not getattr(self.model, "has_kl", False):
            raise UserError(f"--latents needs a VAE-family model; {files.uri} is a {self.meta['class']}")
        if not latents and not hasattr(self.model, "codebook_size"):
            raise UserError(f"{files.uri} is a {self.meta['class']} without codes; pass --latents for VAE models")
        self.transform = model_transform(self.meta)
        self.specs = self._probe_specs()

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        with autocast(self.precision, self.device):
            outputs = self._forward_model(x, y)
        return [o.float() if o.is_floating_point() else o for o in outputs]  # latents leave in fp32

    def _forward_model(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        if self.latents:
            try:
                mu, _ = self.model.encode(x, y)
            except (TypeError, ValueError):
                raise UserError(f"{self.meta['class']}.encode does not return (mean, log-variance); "
                                "--latents supports VAE-family models") from None
            return split_latents(self.model, mu)
        codes = self.model.encode(x)
        return list(codes) if isinstance(codes, (tuple, list)) else [codes]

    def _probe_specs(self) -> list[ArraySpec]:
        t = self.transform
        x = torch.zeros(1, t.channels, t.size, t.size, device=self.device)
        outputs = self._forward(x, torch.zeros(1, dtype=torch.long, device=self.device))
        if self.latents:
            return [ArraySpec(n, tuple(o.shape[1:]), "float16") for n, o in zip(latent_names(self.model), outputs)]
        sizes = self.model.codebook_size
        sizes = list(sizes) if isinstance(sizes, (tuple, list)) else [sizes] * len(outputs)
        names = ["codes"] if len(outputs) == 1 else [f"codes_{i}" for i in range(len(outputs))]
        return [ArraySpec(n, tuple(o.shape[1:]), codes_dtype(int(k)), int(k)) for n, o, k in zip(names, outputs, sizes)]

    def encode(self, images: np.ndarray, labels: np.ndarray, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        x, y = to_device(torch.from_numpy(images), self.device), to_device(torch.from_numpy(labels), self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W), NHWC in memory: channels_last
        host = to_host(self._forward(x, y.clamp(min=0)), self.device)  # conditional VAEs need a class id
        return {spec.name: out.numpy().astype(spec.dtype) for spec, out in zip(self.specs, host)}
