"""Quantizers for the VQ family and the typed sub-config that picks one.

Every quantizer maps `(..., dim)` latents to `QuantizerOutput(codes, indices, loss)`, has
`indices_to_codes(indices)` (exactly the forward's codes) and `codebook_size`. Kinds: vq (EMA or codebook
loss; cosine, factorized, rotation trick), rvq, fsq, lfq, bsq (sign bits + entropy penalty), simvq,
multiscale (VAR: residuals at several scales, one shared codebook; indices a tuple of maps, coarse to fine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from tokenmill.models.quantizers.collectives import Collectives, distributed_collectives, set_collectives
from tokenmill.models.quantizers.fsq import FSQ
from tokenmill.models.quantizers.lfq import BSQ, LFQ
from tokenmill.models.quantizers.multiscale import MultiScaleQuantizer, check_scales
from tokenmill.models.quantizers.residual_vq import ResidualVQ
from tokenmill.models.quantizers.simvq import SimVQ
from tokenmill.models.quantizers.vector_quantizer import QuantizerOutput, VectorQuantizer
from tokenmill.models.ranges import STRICT, Bits, Count, Fraction, NonNegative, Positive, PositiveInt


@dataclass
class QuantizerConfig:
    kind: Literal["vq", "rvq", "fsq", "lfq", "bsq", "simvq", "multiscale"] = "vq"
    codebook_size: PositiveInt = 512  # vq, rvq (per stage), simvq, multiscale (shared by the scales)
    codebook_dim: Count = 0  # vq, rvq, multiscale: 0 looks up in the latent dim; >0 a factorized low-dim lookup
    beta: NonNegative = 0.25  # commitment weight (all but fsq)
    # vq with ema: false: weight of the codebook term ‖sg(z) − e‖² (taming's VQGAN: beta 1.0, codebook_weight 0.25,
    # its `legacy` loss that puts β on the codebook term instead of the commitment term)
    codebook_weight: NonNegative = 1.0
    ema: bool = True  # EMA codebook updates instead of the codebook loss
    decay: Fraction = 0.99
    eps: Positive = 1e-5  # Laplace smoothing of EMA counts
    kmeans_init: bool = True
    kmeans_iters: Count = 10
    dead_code_threshold: NonNegative = 1.0  # EMA count (rows per step, all ranks) below which a code restarts; 0 = off
    cosine: bool = False  # l2-normalised codes and inputs
    num_stages: PositiveInt = 4  # rvq
    scales: tuple[int, ...] = ()  # multiscale: token map sides, increasing, ending at the latent grid side
    levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: values per dimension
    seed: Count = 0  # restart/k-means draws; simvq: the frozen codebook
    rotation_trick: bool = False  # vq, simvq: rotation-trick gradient instead of straight-through
    bits: Bits = 10  # lfq, bsq: codebook of 2^bits sign codes
    entropy_weight: NonNegative = 0.1  # lfq, bsq: weight of the entropy penalty
    diversity: NonNegative = 1.0  # lfq, bsq: codebook-entropy weight inside the penalty
    inv_temperature: Positive = 1.0  # lfq, bsq: τ of the soft assignment, bit logit 4·τ·scale·h (see lfq.py)
    entropy_group_bits: PositiveInt = 10  # lfq, bsq: codebook entropy exact up to this many bits, grouped above

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)  # JSON/YAML give lists; keep configs comparable
        self.scales = tuple(self.scales)
        if self.kind == "multiscale" and self.rotation_trick:
            raise ValueError("quantizer.rotation_trick does not apply to kind multiscale (straight-through on the "
                             "sum of scales); remove it")


def build_quantizer(config: QuantizerConfig, dim: int, seed_offset: int = 0) -> nn.Module:
    """The quantizer `config.kind` for `dim`-channel latents."""
    if config.kind == "fsq":
        return FSQ(dim, config.levels)
    if config.kind in ("lfq", "bsq"):
        binary = LFQ if config.kind == "lfq" else BSQ
        return binary(dim, config.bits, beta=config.beta, entropy_weight=config.entropy_weight,
                      diversity=config.diversity, inv_temperature=config.inv_temperature,
                      group_bits=config.entropy_group_bits)
    if config.kind == "simvq":
        return SimVQ(dim, config.codebook_size, beta=config.beta, rotation_trick=config.rotation_trick,
                     seed=config.seed + seed_offset)
    options = dict(
        codebook_size=config.codebook_size, codebook_dim=config.codebook_dim, beta=config.beta,
        ema=config.ema, decay=config.decay, eps=config.eps, kmeans_init=config.kmeans_init,
        kmeans_iters=config.kmeans_iters, dead_code_threshold=config.dead_code_threshold,
        cosine=config.cosine, seed=config.seed + seed_offset,
    )
    if config.kind == "rvq":
        return ResidualVQ(dim, num_stages=config.num_stages, **options)
    if config.kind == "multiscale":
        return MultiScaleQuantizer(dim, check_scales(config.scales), **options)
    if config.kind == "vq":
        return VectorQuantizer(dim, rotation_trick=config.rotation_trick, codebook_weight=config.codebook_weight,
                               **options)
    raise ValueError(f"unknown quantizer kind {config.kind!r}; use vq, rvq, fsq, lfq, bsq, simvq or multiscale")


__all__ = [
    "BSQ", "FSQ", "LFQ", "Collectives", "MultiScaleQuantizer", "QuantizerConfig", "QuantizerOutput", "ResidualVQ",
    "SimVQ", "VectorQuantizer", "build_quantizer", "check_scales", "distributed_collectives", "set_collectives",
]
