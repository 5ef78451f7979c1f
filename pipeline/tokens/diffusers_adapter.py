"""Pretrained diffusers autoencoders as tokenizers: `--model diffusers:PATH`.

PATH is a `save_pretrained` folder (local or any fsspec URL) or a hub id `org/name[/subfolder]`
already in the local Hugging Face cache; nothing is ever downloaded. Two classes are accepted:

- `VQModel` -> codes `(h, w)` (the index of `quantize` on `encode(x).latents`), decoded through
  the codebook and `decode(..., force_not_quantize=True)`;
- `AutoencoderKL` -> latents `(C, h, w)` float16: the posterior mean, or (`--latents sample`) a
  sample whose noise is seeded by the sample's key, so a resumed run draws the same; stored as
  `(z - shift_factor) * scaling_factor`, the scale a latent-diffusion model trains on, and
  decoded with the inverse.

Pixels: uint8 `(B, H, W, C)` -> float `(B, C, H, W)` in [-1, 1], at the config's `sample_size`
(center crop) unless `--size` / `--crop` say otherwise. The tokenizer interface is the one
`pipeline.tokens.encoder.TokenEncoder` offers: `specs`, `transform`, `encode`, plus `decode`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.shards.images import TransformConfig
from tokenmill.pipeline.tokens.store_format import ArraySpec, codes_dtype

PREFIX = "diffusers:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CLASSES = ("VQModel", "AutoencoderKL")
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
            model = cls.from_pretrained(directory, local_files_only=True)
        return model.to(device).eval().requires_grad_(False)


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
        raise UserError(f"{ref} is a {kind or 'model without _class_name'}, not a VQModel or AutoencoderKL; "
                        "tokenmill tokenizes with diffusers autoencoders only")
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


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


class DiffusersTokenizer:
    """`encode(images uint8 (B, H, W, C), labels, keys)` -> {array: numpy rows}; `decode`."""

    def __init__(self, files: DiffusersFiles, latents: str | None, device: str = "cpu",
                 size: int | None = None, crop: str | None = None):
        self.files, self.kind, self.mode = files, files.class_name, latents
        if self.kind == "VQModel" and latents:
            raise UserError(f"{files.uri} is a VQModel (codes); --latents needs an AutoencoderKL")
        if self.kind == "AutoencoderKL" and not latents:
            raise UserError(f"{files.uri} is an AutoencoderKL (continuous latents): pass --latents mean|sample")
        self.device = torch.device(device)
        self.model = files.load(self.device)
        self.config = json.loads(files.config)
        sample_size = self.config.get("sample_size", 256)
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        channels = int(self.config.get("in_channels", 3))
        if channels not in (1, 3):
            raise UserError(f"{files.uri} takes {channels}-channel images; tokenmill feeds grey or RGB")
        self.transform = TransformConfig(size=size or int(sample_size), channels=channels,
                                         resize="resize" if crop == "resize" else "center-crop")
        self.scaling = float(self.config.get("scaling_factor") or 1.0)
        self.shift = float(self.config.get("shift_factor") or 0.0)
        self.codebook_size = int(self.config.get("num_vq_embeddings", 256)) if self.kind == "VQModel" else None
        self.specs = self._probe_specs()

    def _probe_specs(self) -> list[ArraySpec]:
        t = self.transform
        rows = self.encode(np.zeros((1, t.size, t.size, t.channels), np.uint8), np.zeros(1, np.int64), ["probe"])
        if self.kind == "VQModel":
            k = self.codebook_size
            return [ArraySpec("codes", rows["codes"].shape[1:], codes_dtype(k), k)]
        return [ArraySpec("latents", rows["latents"].shape[1:], "float16")]

    def lineage(self) -> dict[str, Any]:
        """What the store's lineage records about this model beyond its weights."""
        return {
            "adapter": "diffusers", "model_class": self.kind, "model_config": self.config,
            "config_sha256": hashlib.sha256(self.files.config).hexdigest(),
            "scaling_factor": self.scaling if self.kind == "AutoencoderKL" else None,
            "shift_factor": self.shift if self.kind == "AutoencoderKL" else None,
            "latents": self.mode, "codebook_size": self.codebook_size,
        }

    @torch.inference_mode()
    def encode(self, images: np.ndarray, labels: np.ndarray, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [-1, 1]
        if self.kind == "VQModel":
            h = self.model.encode(x).latents  # (B, D, h, w) before quantization
            indices = self.model.quantize(h)[2][2].reshape(h.shape[0], *h.shape[2:])  # (B, h, w)
            return {"codes": indices.cpu().numpy().astype(codes_dtype(self.codebook_size))}
        dist = self.model.encode(x).latent_dist
        z = dist.mean
        if self.mode == "sample":  # noise from the sample's key: the same draw on every rerun
            noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(_key_seed(k)))
                                 for k in keys or [""] * len(z)]).to(z.device)
            z = z + dist.std * noise
        return {"latents": ((z - self.shift) * self.scaling).cpu().numpy().astype(np.float16)}

    @torch.inference_mode()
    def decode(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Stored rows (one array) -> images (B, C, H, W) in [0, 1]."""
        rows = torch.from_numpy(np.asarray(arrays[0])).to(self.device)
        if self.kind == "VQModel":
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
        return ((images + 1.0) / 2.0).clamp_(0.0, 1.0).cpu()
