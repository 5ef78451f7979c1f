"""Quantizers for the VQ family and the typed sub-config that picks one.

Every quantizer maps `(..., dim)` latents to `QuantizerOutput(codes, indices, loss)`, has
`indices_to_codes(indices)` (exactly the forward's codes) and `codebook_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from models.quantizers.collectives import Collectives, distributed_collectives, set_collectives
from models.quantizers.fsq import FSQ
from models.quantizers.residual_vq import ResidualVQ
from models.quantizers.vector_quantizer import QuantizerOutput, VectorQuantizer


@dataclass
class QuantizerConfig:
    kind: Literal["vq", "rvq", "fsq"] = "vq"
    codebook_size: int = 512  # vq, rvq (per stage)
    codebook_dim: int = 0  # vq, rvq: 0 looks up in the latent dim; >0 a factorized low-dim lookup
    beta: float = 0.25  # commitment weight
    ema: bool = True  # EMA codebook updates instead of the codebook loss
    decay: float = 0.99
    eps: float = 1e-5  # Laplace smoothing of EMA counts
    kmeans_init: bool = True
    kmeans_iters: int = 10
    dead_code_threshold: float = 1.0  # EMA count (rows per step, all ranks) below which a code restarts; 0 = off
    cosine: bool = False  # l2-normalised codes and inputs
    num_stages: int = 4  # rvq
    levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: values per dimension
    seed: int = 0  # restart/k-means draws

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)  # JSON/YAML give lists; keep configs comparable


def build_quantizer(config: QuantizerConfig, dim: int, seed_offset: int = 0) -> nn.Module:
    """The quantizer `config.kind` for `dim`-channel latents."""
    if config.kind == "fsq":
        return FSQ(dim, config.levels)
    options = dict(
        codebook_size=config.codebook_size, codebook_dim=config.codebook_dim, beta=config.beta,
        ema=config.ema, decay=config.decay, eps=config.eps, kmeans_init=config.kmeans_init,
        kmeans_iters=config.kmeans_iters, dead_code_threshold=config.dead_code_threshold,
        cosine=config.cosine, seed=config.seed + seed_offset,
    )
    if config.kind == "rvq":
        return ResidualVQ(dim, num_stages=config.num_stages, **options)
    if config.kind == "vq":
        return VectorQuantizer(dim, **options)
    raise ValueError(f"unknown quantizer kind {config.kind!r}; use vq, rvq or fsq")


__all__ = [
    "FSQ", "Collectives", "QuantizerConfig", "QuantizerOutput", "ResidualVQ", "VectorQuantizer",
    "build_quantizer", "distributed_collectives", "set_collectives",
]
