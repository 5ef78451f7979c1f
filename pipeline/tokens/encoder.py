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
    return PendingRows(None, outputs, device, []).host()


class PendingRows:
    """A batch whose encoding was launched (`TokenEncoder.start`) and whose rows are not read yet.
    On CUDA the outputs travel to pinned host memory without blocking and an event marks their
    arrival: `rows()` waits for that batch alone, so the next batch's copy and kernels are already
    queued behind it (double buffering); on the CPU the work is already done."""

    def __init__(self, specs, outputs: list[torch.Tensor], device: torch.device, keep: list[torch.Tensor]):
        self.specs, self.keep = specs, keep  # keep: pinned inputs, alive until their copy has run
        cuda = device.type == "cuda"
        self.outputs = [o.to("cpu", non_blocking=cuda) for o in outputs]
        self.event = None
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))

    def host(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()  # this batch's copies only; later batches keep running
        self.keep = []
        return self.outputs

    def rows(self) -> dict[str, np.ndarray]:
        """{array name: numpy rows (B, ...)} in the store's dtypes."""
        return {spec.name: out.numpy().astype(spec.dtype) for spec, out in zip(self.specs, self.host())}


class Done:
    """`PendingRows` of an encoder without `start` (adapters): rows computed already."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self._rows = rows

    def rows(self) -> dict[str, np.ndarray]:
        return self._rows


def start_encode(encoder, images: np.ndarray, labels: np.ndarray, keys: list[str]):
    """`encoder.start(...)` when it has one (launches, returns `PendingRows`), else its `encode`."""
    if hasattr(encoder, "start"):
        return encoder.start(images, labels, keys)
    return Done(encoder.encode(images, labels, keys))


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
        self.copy_stream = None  # CUDA: the side stream of host->device copies (made on first use)

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
        return self.start(images, labels, keys).rows()

    def start(self, images: np.ndarray, labels: np.ndarray, keys: list[str] | None = None) -> PendingRows:
        """Launch the encoding of images uint8 (B, H, W, C) and labels int64 (B,); on CUDA nothing
        here waits for the device (pinned, non-blocking copies in both directions)."""
        host = [torch.from_numpy(images), torch.from_numpy(labels)]
        if self.device.type == "cuda":
            host = [t.pin_memory() for t in host]
        x, y = self._upload(host)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W), NHWC in memory: channels_last
        outputs = self._forward(x, y.clamp(min=0))  # conditional VAEs need a class id
        return PendingRows(self.specs, outputs, self.device, host)

    def _upload(self, host: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors onto the device. On CUDA the copies run on a side stream, so the copy of
        batch i+1 overlaps the kernels of batch i; the compute stream waits for them."""
        if self.device.type != "cuda":
            return [t.to(self.device) for t in host]
        if self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            moved = [t.to(self.device, non_blocking=True) for t in host]
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        for t in moved:  # allocated on the copy stream, used on the compute stream
            t.record_stream(compute)
        return moved
