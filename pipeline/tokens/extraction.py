"""Which tokenizer `tokenize` and `decode` use, and how: the model reference (native or
`diffusers:`), the latent mode, preprocessing overrides and augmentation at extraction.

`load_tokenizer` returns an object with the interface the tokenize job uses: `specs`,
`transform`, `encode(images, labels, keys) -> {array: rows}`; `decode_rows` inverts it.
`--augment flip` stores every sample twice (as is, mirrored) along axis 1 of each array
(LlamaGen's ten-crop and fast-DiT's flips do the same offline); readers pick one variant per
item and epoch (`pipeline.tokens.store_rows`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenmill.models.errors import UserError
from tokenmill.pipeline.tokens.diffusers_adapter import DiffusersFiles, DiffusersTokenizer
from tokenmill.pipeline.tokens.latent_groups import join_latents
from tokenmill.pipeline.tokens.store_format import ArraySpec

LATENT_MODES = ("mean", "sample")
CROPS = ("center", "resize")
AUGMENTS = {"flip": 2}  # name -> variants per sample


@dataclass(frozen=True)
class ExtractionOptions:
    latents: str | None = None  # None: codes (or a DC-AE's latents); "mean" or "sample" (AutoencoderKL only)
    size: int | None = None  # diffusers: image size instead of the config's sample_size
    crop: str | None = None  # diffusers: "center" (default) or "resize"
    augment: str | None = None  # None or a name in AUGMENTS

    @classmethod
    def build(cls, latents: bool | str | None = None, size: int | None = None, crop: str | None = None,
              augment: str | None = None) -> "ExtractionOptions":
        """Checked options; `latents=True` means "mean" (the flag's meaning before it took a value)."""
        latents = "mean" if latents is True else (latents or None)
        if latents is not None and latents not in LATENT_MODES:
            raise UserError(f"--latents {latents!r}: choose one of {', '.join(LATENT_MODES)}")
        if size is not None and size < 1:
            raise UserError(f"--size must be >= 1, got {size}")
        if crop is not None and crop not in CROPS:
            raise UserError(f"--crop {crop!r}: choose one of {', '.join(CROPS)}")
        if augment is not None and augment not in AUGMENTS:
            raise UserError(f"--augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
        return cls(latents, size, crop, augment)

    @classmethod
    def from_lineage(cls, lineage: dict[str, Any]) -> "ExtractionOptions":
        """The options a store was made with (decoding needs only the mode)."""
        mode = lineage.get("latents") or ("mean" if lineage.get("mode") == "latents" else None)
        return cls(latents=mode)


def resolve_tokenizer(ref: str, tracking_uri: str | None = None, storage_options: dict | None = None):
    """`ModelFiles` (native models: paths, runs:/, models:/) or `DiffusersFiles` (`diffusers:`):
    `pipeline.registry.resolver.resolve_reference`."""
    from tokenmill.pipeline.registry.resolver import resolve_reference

    return resolve_reference(ref, tracking_uri, storage_options)


def load_tokenizer(files, options: ExtractionOptions, device: str = "cpu", precision: str = "fp32"):
    """The loaded tokenizer for `files`, wrapped in the augmentation when one is asked for.
    `precision` (fp32/bf16/fp16): the encoder's autocast dtype, for tokenmill and diffusers models."""
    if isinstance(files, DiffusersFiles):
        tokenizer = DiffusersTokenizer(files, options.latents, device, options.size, options.crop, precision)
    else:
        from tokenmill.pipeline.tokens.encoder import TokenEncoder

        if options.size is not None or options.crop is not None:
            raise UserError("--size/--crop apply to diffusers: models; a tokenmill model uses the transform "
                            "saved with it")
        if options.latents == "sample":
            raise UserError("--latents sample is for diffusers AutoencoderKL models; tokenmill VAEs store "
                            "posterior means (--latents mean)")
        tokenizer = TokenEncoder(files, options.latents is not None, device, precision)
    return Augmented(tokenizer, options.augment) if options.augment else tokenizer


def tokenizer_lineage(files, tokenizer, options: ExtractionOptions) -> dict[str, Any]:
    """The store lineage's model part: which weights and config, every way to find them again
    (`model_source`, `pipeline.registry.resolver`), what was stored and how (and, for a multi-scale
    tokenizer, each level's scale)."""
    from tokenmill.pipeline.registry.resolver import source

    base = tokenizer.inner if isinstance(tokenizer, Augmented) else tokenizer
    if isinstance(base, DiffusersTokenizer):
        model = base.lineage()
    else:
        model = {"adapter": "tokenmill", "model_class": base.meta["class"], "model_config": base.meta["config"],
                 "config_sha256": hashlib.sha256(files.config).hexdigest(),
                 "codebook_size": getattr(base.model, "codebook_size", None) if not options.latents else None}
        if "converted_from" in base.meta.get("extra", {}):  # a published checkpoint: its kind and sha256
            model["converted_from"] = base.meta["extra"]["converted_from"]
    return {
        "model_uri": files.uri, "model_version": files.version, "weights_sha256": files.weights_sha256,
        "model_source": source(files), **model,
        "mode": "latents" if options.latents or getattr(base, "stores_latents", False) else "codes",
        "token_shape": [list(s.row_shape) for s in tokenizer.specs],
        **_scales_lineage(base),
        "transform": tokenizer.transform.model_dump(mode="json"),
        **({"augment": {"name": options.augment, "variants": AUGMENTS[options.augment]}} if options.augment else {}),
    }


def _scales_lineage(tokenizer) -> dict[str, Any]:
    """`{"scales": [s, ...]}`: the side of each level's token map, in level order (coarse to
    fine), for a multi-scale tokenizer (VAR: one shared codebook); empty for any other."""
    from tokenmill.models.tokenizer import code_scales

    scales = code_scales(getattr(tokenizer, "model", None))
    return {"scales": list(scales)} if scales else {}


class Augmented:
    """Encodes each batch once per variant and stacks the rows along axis 1: row shape (V, ...)."""

    def __init__(self, inner, augment: str):
        self.inner, self.augment = inner, augment
        self.transform = inner.transform
        self.specs = [ArraySpec(s.name, (AUGMENTS[augment], *s.row_shape), s.dtype, s.codebook_size)
                      for s in inner.specs]

    def encode(self, images: np.ndarray, labels: np.ndarray, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        keys = list(keys) if keys is not None else [str(i) for i in range(len(images))]
        return self.start(images, labels, keys).rows()

    def start(self, images: np.ndarray, labels: np.ndarray, keys: list[str]) -> "AugmentedRows":
        """`encode`, launched: both variants are queued before either is read."""
        from tokenmill.pipeline.tokens.encoder import start_encode

        flipped = np.ascontiguousarray(images[:, :, ::-1])
        return AugmentedRows([start_encode(self.inner, images, labels, list(keys)),
                              start_encode(self.inner, flipped, labels, [f"{k}#flip" for k in keys])])


class AugmentedRows:
    """The launched variants of one batch; `rows()` stacks them along axis 1 as `encode` does."""

    def __init__(self, pending: list):
        self.pending = pending

    def rows(self) -> dict[str, np.ndarray]:
        rows = [p.rows() for p in self.pending]
        return {name: np.stack([r[name] for r in rows], axis=1) for name in rows[0]}


@torch.inference_mode()
def decode_rows(tokenizer, names: list[str], arrays: list[np.ndarray]) -> torch.Tensor:
    """Stored rows (one array per store array, one variant) -> images (B, C, H, W) in [0, 1]."""
    if isinstance(tokenizer, DiffusersTokenizer):
        return tokenizer.decode(arrays)
    model = tokenizer.model
    if names[0].startswith("latents"):
        z = join_latents([torch.from_numpy(a.astype(np.float32)).to(tokenizer.device) for a in arrays])
        return model.decode(z).cpu()
    codes = [torch.from_numpy(a.astype(np.int64)).to(tokenizer.device) for a in arrays]
    return model.decode(codes[0] if len(codes) == 1 else tuple(codes)).cpu()
