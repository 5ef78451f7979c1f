"""Pretrained diffusers autoencoders as tokenizers: `--model diffusers:PATH`.

PATH is a `save_pretrained` folder (local or any fsspec URL) or a hub id `org/name[/subfolder]`
already in the local Hugging Face cache; nothing is ever downloaded. The classes accepted (`KINDS`):

- `VQModel` -> codes `(h, w)` (the index of `quantize` on `encode(x).latents`), decoded through
  the codebook and `decode(..., force_not_quantize=True)`;
- `AutoencoderKL` -> latents `(C, h, w)` float16: the posterior mean, or (`--latents sample`) a
  sample whose noise is seeded by the sample's key, so a resumed run draws the same; stored as
  `(z - shift_factor) * scaling_factor`, the scale a latent-diffusion model trains on, and
  decoded with the inverse;
- `AutoencoderDC` (DC-AE) -> latents `(C, h, w)` float16: `encode(x).latent`, deterministic (no
  posterior, so no `--latents sample`), stored as `latent * scaling_factor` (no shift) and
  decoded with the inverse.

Pixels: uint8 `(B, H, W, C)` -> float `(B, C, H, W)` in [-1, 1], at the config's `sample_size`
(center crop) unless `--size` / `--crop` say otherwise. The tokenizer interface is the one
`pipeline.tokens.encoder.TokenEncoder` offers: `specs`, `transform`, `encode`, plus `decode`.

Precision as `TokenEncoder`'s (`--precision`): bf16/fp16 autocast around the networks, codes
picked and posteriors formed in fp32 from their outputs, channels_last and pinned non-blocking
copies on CUDA. fp16 is refused for a model whose config sets `force_upcast` (diffusers' own
flag for VAEs that overflow in fp16, e.g. SD's; its pipelines then run them in fp32).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.tokens.encoder import check_precision, inference_layout, to_device, to_host
from tokenmill.pipeline.tokens.store_format import ArraySpec, codes_dtype
from tokenmill.pipeline.training.precision import autocast

PREFIX = "diffusers:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def _kl_latents(output, mode: str | None, keys: list[str] | None) -> torch.Tensor:
    """The posterior mean, or a draw whose noise is seeded by the sample's key (the same on every rerun)."""
    dist = output.latent_dist
    dist = type(dist)(dist.parameters.float())  # mean and std in fp32 from the (B, 2C, h, w) moments
    if mode != "sample":
        return dist.mean
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(_key_seed(k)))
                         for k in keys or [""] * len(dist.mean)])
    return dist.mean + dist.std * to_device(noise, dist.mean.device)


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass(frozen=True)
class Kind:
    """What one diffusers class stores and which `--latents` modes it takes (None: no flag)."""

    array: str  # "codes" or "latents"
    modes: tuple[str | None, ...]
    shift: bool = False  # the config's shift_factor applies
    latents: Callable[..., torch.Tensor] | None = None  # (encode output, mode, keys) -> unscaled (B, C, h, w)


KINDS = {
    "VQModel": Kind("codes", (None,)),
    "AutoencoderKL": Kind("latents", ("mean", "sample"), shift=True, latents=_kl_latents),
    # DC-AE: deterministic, no posterior to sample ("mean" is accepted: it is the latent itself)
    "AutoencoderDC": Kind("latents", (None, "mean"), latents=lambda output, mode, keys: output.latent.float()),
}
CLASSES = tuple(KINDS)
EXTRA = 'pip install "tokenmill[diffusers]"'
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+)?")


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise UserError(f"--model diffusers:… needs the diffusers package: {EXTRA}") from None
    diffusers.utils.logging.set_verbosity_error()  # no per-load chatter on the job's console
    return diffusers


@dataclass(frozen=True)
class DiffusersFiles:
    """A diffusers model's bytes (config.json + safetensors weights): shipped to actors as is."""

    uri: str
    config: bytes
    weights: bytes
    version: str | None = None
    locations: tuple[str, ...] = ()  # `diffusers:` + the absolute folder or URL (a hub id as given)

    @property
    def weights_sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    @property
    def class_name(self) -> str:
        return json.loads(self.config)["_class_name"]

    def load(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        cls = getattr(import_diffusers(), self.class_name)
        with tempfile.TemporaryDirectory(prefix="tokenmill-diffusers-") as directory:
            (Path(directory) / CONFIG_FILE).write_bytes(self.config)
            (Path(directory) / WEIGHTS_FILE).write_bytes(self.weights)
            try:
                model, info = cls.from_pretrained(directory, local_files_only=True, output_loading_info=True)
            except (RuntimeError, ValueError, TypeError) as err:  # size mismatches, unknown block types
                raise UserError(f"{self.uri}: its {CONFIG_FILE} does not fit its weights: "
                                f"{_first_line(err)}") from None
        unfit = [f"{what} {', '.join(sorted(keys)[:3])}{' …' if len(keys) > 3 else ''}" for what, keys in
                 (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"])) if keys]
        if unfit:  # diffusers only warns, and would run with freshly initialised layers
            raise UserError(f"{self.uri}: its {CONFIG_FILE} does not fit its weights ({'; '.join(unfit)})")
        return model.to(device).eval().requires_grad_(False)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]  # "Error(s) in loading state_dict …" + its first mismatch


def resolve_diffusers(ref: str, storage_options: dict | None = None) -> DiffusersFiles:
    """`diffusers:PATH` -> its files; one UserError naming what is missing or wrong."""
    import fsspec

    location = ref[len(PREFIX):]
    found = ref  # where the same files are from any folder
    if "://" in location and not location.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    elif Path(location.removeprefix("file://")).is_dir():
        fs, path = fsspec.filesystem("file"), location.removeprefix("file://")
        found = PREFIX + str(Path(path).resolve())
    elif _HUB_ID.fullmatch(location) and not Path(location).exists():
        fs, path = fsspec.filesystem("file"), _hub_cache_folder(ref, location)
    else:
        raise UserError(f"{ref}: {location!r} is not a folder, and not a hub id (org/name[/subfolder]) "
                        "in the local Hugging Face cache")
    try:
        config = fs.cat_file(f"{path}/{CONFIG_FILE}")
    except FileNotFoundError:
        raise UserError(f"{ref} is not a diffusers model folder: it has no {CONFIG_FILE}") from None
    try:
        kind = json.loads(config).get("_class_name")
    except (ValueError, AttributeError):
        raise UserError(f"{ref}: {CONFIG_FILE} is not a JSON object") from None
    if kind not in CLASSES:
        accepted = f"{', '.join(CLASSES[:-1])} or {CLASSES[-1]}"
        raise UserError(f"{ref} is a {kind or 'model without _class_name'}, not a {accepted}; "
                        "tokenmill tokenizes with these diffusers autoencoders only")
    try:
        weights = fs.cat_file(f"{path}/{WEIGHTS_FILE}")
    except FileNotFoundError:
        raise UserError(f"{ref}: {WEIGHTS_FILE} is missing (tokenmill loads safetensors only; re-save with "
                        "save_pretrained(..., safe_serialization=True))") from None
    return DiffusersFiles(ref, config, weights, locations=(found,))


def _hub_cache_folder(ref: str, location: str) -> str:
    """The cached snapshot folder of hub id `org/name[/subfolder]`; offline only."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise UserError(f"--model diffusers:… needs the diffusers package: {EXTRA}") from None

    parts = location.split("/")
    repo, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        folder = snapshot_download(repo, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or a malformed cache entry
        raise UserError(f"{ref}: no folder {location!r} here and {repo} is not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}); nothing is downloaded at run time: fetch it once with "
                        f"`hf download {repo}` or pass a save_pretrained folder") from None
    return str(Path(folder) / subfolder) if subfolder else folder


class DiffusersTokenizer:
    """`encode(images uint8 (B, H, W, C), labels, keys)` -> {array: numpy rows}; `decode`."""

    def __init__(self, files: DiffusersFiles, latents: str | None, device: str = "cpu",
                 size: int | None = None, crop: str | None = None, precision: str = "fp32"):
        self.files, self.kind, self.precision = files, files.class_name, precision
        self.layout = KINDS[self.kind]
        if latents not in self.layout.modes:
            raise UserError(f"{files.uri} is a {self.kind} ({self.layout.array}): " + _modes_hint(self.layout.modes))
        self.mode = latents if None not in self.layout.modes else None  # recorded where the flag is a choice
        self.config = json.loads(files.config)
        check_precision(precision)
        if precision == "fp16" and self.config.get("force_upcast", self.kind == "AutoencoderKL"):
            raise UserError(f"--precision fp16: {files.uri} sets force_upcast (it overflows in fp16); "
                            "use --precision bf16 or fp32")
        self.device = torch.device(device)
        self.model = inference_layout(files.load(self.device), self.device)
        sample_size = self.config.get("sample_size", 256)
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        channels = int(self.config.get("in_channels", 3))
        if channels not in (1, 3):
            raise UserError(f"{files.uri} takes {channels}-channel images; tokenmill feeds grey or RGB")
        self.transform = TransformConfig(size=size or int(sample_size), channels=channels,
                                         resize="resize" if crop == "resize" else "center-crop")
        self.scaling = float(self.config.get("scaling_factor") or 1.0)
        self.shift = float(self.config.get("shift_factor") or 0.0) if self.layout.shift else 0.0
        self.codebook_size = int(self.config.get("num_vq_embeddings", 256)) if self.layout.array == "codes" else None
        self.specs = self._probe_specs()

    def _probe_specs(self) -> list[ArraySpec]:
        t = self.transform
        rows = self.encode(np.zeros((1, t.size, t.size, t.channels), np.uint8), np.zeros(1, np.int64), ["probe"])
        if self.layout.array == "codes":
            k = self.codebook_size
            return [ArraySpec("codes", rows["codes"].shape[1:], codes_dtype(k), k)]
        return [ArraySpec("latents", rows["latents"].shape[1:], "float16")]

    @property
    def stores_latents(self) -> bool:
        return self.layout.array == "latents"

    def lineage(self) -> dict[str, Any]:
        """What the store's lineage records about this model beyond its weights."""
        return {
            "adapter": "diffusers", "model_class": self.kind, "model_config": self.config,
            "config_sha256": hashlib.sha256(self.files.config).hexdigest(),
            "scaling_factor": self.scaling if self.stores_latents else None,
            "shift_factor": self.shift if self.stores_latents else None,
            "latents": self.mode, "codebook_size": self.codebook_size,
        }

    @torch.inference_mode()
    def encode(self, images: np.ndarray, labels: np.ndarray, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        x = to_device(torch.from_numpy(images), self.device)  # uint8 (B, H, W, C)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, C, H, W) in [-1, 1], NHWC in memory
        with autocast(self.precision, self.device):
            h = self.model.encode(x)
        if self.layout.array == "codes":
            h = h.latents.float()  # (B, D, h, w) before quantization: codes are picked in fp32
            indices = self.model.quantize(h)[2][2].reshape(h.shape[0], *h.shape[2:])  # (B, h, w)
            return {"codes": to_host([indices], self.device)[0].numpy().astype(codes_dtype(self.codebook_size))}
        z = self.layout.latents(h, self.mode, keys)  # (B, C, h, w) in fp32
        latents = to_host([(z - self.shift) * self.scaling], self.device)[0]
        return {"latents": latents.numpy().astype(np.float16)}

    @torch.inference_mode()
    def decode(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Stored rows (one array) -> images (B, C, H, W) in [0, 1]."""
        rows = to_device(torch.from_numpy(np.asarray(arrays[0])), self.device)
        with autocast(self.precision, self.device):
            if self.layout.array == "codes":
                codes = rows.long()
                dim = self.model.quantize.vq_embed_dim
                shape = (codes.shape[0], *codes.shape[1:], dim)  # (B, h, w, D)
                if self.model.config.lookup_from_codebook:
                    images = self.model.decode(codes.reshape(-1), force_not_quantize=True, shape=shape).sample
                else:
                    quant = self.model.quantize.get_codebook_entry(codes.reshape(-1), shape)  # (B, D, h, w)
                    images = self.model.decode(quant, force_not_quantize=True).sample
            else:
                images = self.model.decode(rows.float() / self.scaling + self.shift).sample
        return to_host([((images.float() + 1.0) / 2.0).clamp_(0.0, 1.0)], self.device)[0]


def _modes_hint(modes: tuple[str | None, ...]) -> str:
    named = [m for m in modes if m]
    if not named:
        return "it stores codes; --latents is for latent autoencoders"
    flag = f"--latents {'|'.join(named)}"
    return f"pass {flag}" if None not in modes else f"no flag or {flag} (its latents are deterministic)"


class DiffusersReconstruction(torch.nn.Module):
    """A diffusers autoencoder as `tokenmill eval` sees a tokenizer: `forward(x)` with x (B, C, H, W)
    in [0, 1] -> `.recon` (B, C, H, W) in [0, 1] and `.indices` (codes (B, h, w), or None for
    latents), through this adapter's encode and decode: what a store made by `tokenize` decodes
    to (latents rounded to the store's float16). A KL is judged on its posterior mean."""

    def __init__(self, files: DiffusersFiles, device: str = "cpu"):
        super().__init__()
        mode = KINDS[files.class_name].modes[0]  # the deterministic mode: None, or a KL's "mean"
        self.tokenizer = DiffusersTokenizer(files, mode, device)
        self.codebook_size = self.tokenizer.codebook_size
        self.token_shape = self.tokenizer.specs[0].row_shape

    def forward(self, x: torch.Tensor):
        from types import SimpleNamespace

        images = (x * 255.0).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # the shards' uint8 again, exactly
        (rows,) = self.tokenizer.encode(images, np.zeros(len(images), np.int64)).values()
        indices = torch.from_numpy(rows.astype(np.int64)) if self.codebook_size else None
        return SimpleNamespace(recon=self.tokenizer.decode([rows]).to(x.device), indices=indices)
