"""VectorQuantizer: nearest-code lookup with a straight-through estimator (VQ-VAE).

Codebook learning is either the codebook loss ‖sg(z) − e‖² (times `codebook_weight`) or EMA updates (decay, Laplace
smoothing); both add β·‖z − sg(e)‖². k-means initialisation from the first training batch and
dead-code restarts keep usage high. Optional cosine (l2-normalised) codes and a factorized
low-dimensional lookup (ViT-VQGAN; with both, LlamaGen's 16,384 x 8 codebook), and the rotation
trick (rotation.py) in place of the straight-through estimator. Distances and every codebook statistic run in fp32 with
autocast disabled: bf16 distances pick wrong codes and bf16 EMA sums overflow/lose mass.

Distributed: statistics go through the injected `collectives` (see collectives.py) and are
identical on every rank; a training step calls them a fixed number of times, and nothing runs
a collective when not training or under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.quantizers.collectives import Collectives, sample_rows
from tokenmill.models.quantizers.rotation import rotation_trick


@dataclass
class QuantizerOutput:
    codes: Tensor  # (..., dim) quantized vectors; gradients pass straight through to the input
    indices: Tensor  # (...) int64, (..., stages) for ResidualVQ, a tuple of (B, s, s) per scale for multiscale
    loss: Tensor  # scalar: codebook/commitment terms, mean over elements


def straight_through(quantized: Tensor, inputs: Tensor) -> Tensor:
    """Value of `quantized`, gradient of identity w.r.t. `inputs`. `inputs - inputs.detach()` is an
    exact zero, so eval-mode values are bit-identical to a plain lookup."""
    return quantized + (inputs - inputs.detach())


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        codebook_size: int = 512,
        codebook_dim: int = 0,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_code_threshold: float = 1.0,
        cosine: bool = False,
        seed: int = 0,
        rotation_trick: bool = False,
        codebook_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.lookup_dim = codebook_dim or dim
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        self.kmeans_iters, self.dead_code_threshold = kmeans_iters, dead_code_threshold
        self.cosine, self.seed, self.rotation_trick = cosine, seed, rotation_trick
        self.codebook_weight = codebook_weight
        factorized = self.lookup_dim != dim
        self.project_in = nn.Linear(dim, self.lookup_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(self.lookup_dim, dim) if factorized else nn.Identity()

        embed = torch.empty(codebook_size, self.lookup_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:  # updated by EMA, not by the optimiser
            self.register_buffer("embed", embed)  # (K, d)
            self.register_buffer("embed_sum", embed.clone())  # (K, d) EMA of per-code sums
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # (K,) EMA of per-code counts
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training updates so far
        self.collectives = Collectives()
        # Host copies of `initted` and `steps`: known here, read from the device only after a state
        # load (once), never on every step; a GPU step then does not wait for the device.
        self._host: dict[str, int] = {"initted": int(not kmeans_init), "steps": 0}

    def _load_from_state_dict(self, *args, **kwargs):
        self._host = {}  # the buffers change: read them again when next needed
        super()._load_from_state_dict(*args, **kwargs)

    def _host_value(self, name: str) -> int:
        if name not in self._host:
            self._host[name] = int(getattr(self, name))
        return self._host[name]

    # -- lookup ---------------------------------------------------------------------------------
    def codebook(self) -> Tensor:
        """(K, d) fp32 codes as used for lookup (unit-norm in cosine mode)."""
        return F.normalize(self.embed, dim=-1) if self.cosine else self.embed

    def distances(self, z: Tensor) -> Tensor:
        """(N, K) squared distances ‖z‖² − 2 z·E + ‖E‖² in fp32 (one fused addmm), for z (N, d)."""
        with torch.autocast(z.device.type, enabled=False):
            z, embed = z.float(), self.codebook().detach().float()
            sq = z.pow(2).sum(1, keepdim=True) + embed.pow(2).sum(1)  # (N, K)
            return torch.addmm(sq, z, embed.t(), alpha=-2.0)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(...) int64 -> (..., dim) codes, exactly the forward's quantized output."""
        with torch.autocast(indices.device.type, enabled=False):
            return self.project_out(F.embedding(indices, self.codebook()))

    def _rows(self, z: Tensor) -> Tensor:
        """(..., dim) -> (N, d) fp32 lookup rows (projected; unit-norm in cosine mode)."""
        flat = self.project_in(z.float()).reshape(-1, self.lookup_dim)
        return F.normalize(flat, dim=-1) if self.cosine else flat

    def forward(self, z: Tensor, learn: bool = True) -> QuantizerOutput:
        """z: (..., dim) -> codes (..., dim), indices (...). With `learn=False` a training step
        only looks up: a caller that quantizes several inputs against this one codebook
        (multiscale.py) calls `initialize` before and `learn` after, once per step."""
        with torch.autocast(z.device.type, enabled=False):
            flat = self._rows(z)  # (N, d) fp32
            update = learn and self.training and torch.is_grad_enabled()
            if update and not self._host_value("initted"):
                self._kmeans_init(flat.detach())
            with torch.no_grad():
                indices = self.distances(flat).argmin(1)  # (N,)
            quantized = F.embedding(indices, self.codebook())  # (N, d), from the pre-update codebook
            loss = self.beta * F.mse_loss(flat, quantized.detach())  # commitment
            if not self.ema:
                loss = loss + self.codebook_weight * F.mse_loss(quantized, flat.detach())  # codebook term
            if update:
                self._update(flat.detach(), indices)
            # The decoder's gradient goes to the encoder only; the codebook learns from its own term.
            gradient_path = rotation_trick if self.rotation_trick else straight_through
            codes = self.project_out(gradient_path(quantized.detach(), flat))
        return QuantizerOutput(codes.reshape(*z.shape[:-1], self.dim), indices.reshape(z.shape[:-1]), loss)

    # -- training-time codebook maintenance (collectives live only here) ------------------------
    @torch.no_grad()
    def initialize(self, z: Tensor) -> None:
        """k-means initialisation from z (..., dim), unless done already (collectives)."""
        if not self._host_value("initted"):
            with torch.autocast(z.device.type, enabled=False):
                self._kmeans_init(self._rows(z.detach()))

    @torch.no_grad()
    def learn(self, z: Tensor, indices: Tensor) -> None:
        """One codebook update (EMA, dead-code restarts) from z (..., dim) and their codes (...),
        as a `forward` with `learn=True` makes (collectives)."""
        with torch.autocast(z.device.type, enabled=False):
            self._update(self._rows(z.detach()), indices.reshape(-1))

    def _generator(self, stream: int, device: torch.device) -> torch.Generator:
        # Seeded by step so every rank (and a resumed run) draws the same rows; `stream` keeps the
        # k-means seeds and the same step's restart rows apart. A generator of the rows' device:
        # the draw then needs no copy from the host.
        seed = self.seed * 1_000_003 + 2 * self._host_value("steps") + stream
        return torch.Generator(device=device).manual_seed(seed)

    def _code_stats(self, z: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Global per-code (sums (K, d), counts (K,)) in one all-reduce."""
        ones = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
        stats = torch.zeros(self.codebook_size, self.lookup_dim + 1, dtype=z.dtype, device=z.device)
        stats.index_add_(0, indices, torch.cat([z, ones], 1))  # (K, d+1): sums | counts
        self.collectives.all_reduce(stats)
        return stats[:, :-1], stats[:, -1]

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor) -> None:
        """Lloyd's k-means over the global batch, seeded with K distinct global rows."""
        centroids = sample_rows(z, self.codebook_size, self._generator(0, z.device), self.collectives)  # (K, d)
        counts = torch.zeros(self.codebook_size, device=z.device)
        for _ in range(self.kmeans_iters):
            self.embed.data.copy_(centroids)
            sums, counts = self._code_stats(z, self.distances(z).argmin(1))
            # Empty clusters keep their seed; dead-code restarts deal with them later.
            centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
            if self.cosine:
                centroids = F.normalize(centroids, dim=-1)
        self.embed.data.copy_(centroids)
        self.cluster_size.copy_(counts)
        if self.ema:
            self.embed_sum.copy_(centroids * counts[:, None])
        self.initted.fill_(True)
        self._host["initted"] = 1

    @torch.no_grad()
    def _update(self, z: Tensor, indices: Tensor) -> None:
        sums, counts = self._code_stats(z, indices)
        self.cluster_size.lerp_(counts, 1 - self.decay)  # decay·N + (1 − decay)·n
        if self.ema:
            self.embed_sum.lerp_(sums, 1 - self.decay)
            total = self.cluster_size.sum()
            # Laplace smoothing: no division by ~0 for rarely used codes; keeps total mass.
            smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
            self.embed.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(z)
        self._host["steps"] = self._host_value("steps") + 1
        self.steps += 1

    def _restart_dead_codes(self, z: Tensor) -> None:
        """Codes whose EMA usage fell below the threshold jump to random encoder outputs z (N, d).
        The dead mask comes from all-reduced counts and the rows from `sample_rows`, so every rank
        agrees. Unconditional and on the device: rows are drawn for all K codes every step and
        `torch.where` keeps the live ones, so no host read decides whether anything is dead (with
        16,384 codes some nearly always are) and the collectives are the same every step."""
        dead = self.cluster_size < self.dead_code_threshold  # (K,)
        rows = sample_rows(z, self.codebook_size, self._generator(1, z.device), self.collectives)  # (K, d)
        self.embed.data.copy_(torch.where(dead[:, None], rows, self.embed))
        self.cluster_size.masked_fill_(dead, self.dead_code_threshold)
        if self.ema:
            self.embed_sum.copy_(torch.where(dead[:, None], rows * self.dead_code_threshold, self.embed_sum))
