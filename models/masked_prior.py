"""A MaskGIT prior (Chang et al. 2022; as in MAGE and MUSE): a bidirectional Transformer that predicts
masked codes, trained under a cosine mask schedule and sampled in a few parallel steps.

Vocabulary = the AR prior's (`models.prior`) with MASK where the AR prior has BOS: codes [0, K),
MASK = K, class tokens K + 1 + label, the "no class" (null) token K + 1 + C (`config.vocab()`).
The model reads `[(class), c_0 .. c_{N-1}]` (the class token only when C > 0; `class_len`), an
unknown code being MASK; codes are the levels' grids in raster order, in store order.

Batches are the AR prior's rows, `[BOS, (class), codes]` (`TokenDataset(add_bos=True, ...)`;
`config.prefix_len` = 1 + (C > 0) is that batch prefix), so the engine's prior task feeds both
kinds the same tokens; the model drops the BOS column.

Training (`forward(tokens, return_loss=True)`): per row a mask ratio r = cos(pi/2 * u), u ~ U[0, 1)
(the cosine schedule), ceil(r N) random codes replaced by MASK, and the cross-entropy over the
masked codes only (nats per masked code; `label_smoothing` on its targets in train mode). Label dropout swaps the class for the null token, as
in the AR prior. In eval mode the masks come from a generator seeded with EVAL_MASK_SEED, so
validation scores the same masks at every step.

Sampling (`sample`): every code starts as MASK; each of `steps` steps draws every masked code
(temperature, top-k, top-p), ranks the draws by log-probability plus Gumbel noise scaled by the
choice temperature (annealed linearly to 0), and re-masks the least confident so that
floor(N cos(pi/2 (t + 1) / steps)) stay masked after step t (at least one new code per step).
Class-free guidance runs conditional and null rows as one batch. Positions as in the AR prior
("learned", or "rope2d" plus a per-level vector with several levels); no KV cache applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.prior import (
    Block,
    PriorConfig,
    TransformerPrior,
    grid_positions,
    norm_layer,
    rope2d_angles,
    sample_logits,
    sampling_autocast,
)
from tokenmill.models.ranges import Fraction, NonNegative, PositiveInt
from tokenmill.models.serialization import register_model

EVAL_MASK_SEED = 0  # eval-mode masks: the same for every validation, so val losses compare


@dataclass
class MaskGITConfig(PriorConfig):
    kind: Literal["maskgit"] = "maskgit"
    sample_steps: PositiveInt = 8  # parallel decoding steps when `sample` is given none
    mask_schedule: Literal["cosine"] = "cosine"  # masked fraction as a function of progress in [0, 1]
    choice_temperature: NonNegative = 4.5  # Gumbel noise on the confidences (MaskGIT's), annealed to 0
    label_smoothing: Fraction = 0.0  # on the masked codes' targets, train mode only (MaskGIT trains with 0.1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def mask(self) -> int:
        return self.codebook_size

    @property
    def class_len(self) -> int:  # class tokens before the codes in the model's input
        return int(self.num_classes > 0)

    def vocab(self) -> dict[str, int]:
        """The token layout, as recorded in a prior's lineage."""
        return {"codebook_size": self.codebook_size, "mask": self.mask, "class_offset": self.class_offset,
                "num_classes": self.num_classes, "null_class": self.null_class}


def cosine_schedule(progress: Tensor | float) -> Tensor | float:
    """The masked fraction at progress in [0, 1]: 1 at 0, 0 at 1."""
    if isinstance(progress, Tensor):
        return torch.cos(math.pi / 2 * progress)
    return math.cos(math.pi / 2 * progress)


MASK_SCHEDULES = {"cosine": cosine_schedule}


def masked_after(step: int, steps: int, length: int, schedule: str = "cosine") -> int:
    """How many of `length` codes the schedule leaves masked after step `step` of `steps` (0 after the last)."""
    if step == steps - 1:
        return 0
    return math.floor(length * MASK_SCHEDULES[schedule]((step + 1) / steps))


@register_model
class MaskGITPrior(nn.Module):
    """Bidirectional Transformer over `[(class), codes or MASK]`; see the module docstring."""

    config_class = MaskGITConfig

    def __init__(self, config: MaskGITConfig):
        super().__init__()
        self.config = c = config
        length = c.class_len + c.seq_len
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        if c.positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(length, c.dim))
        else:
            angles = rope2d_angles(c)[1:]  # (length, hd/2): the AR table without its BOS slot
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
            if len(c.grid) > 1:
                self.level_embed = nn.Parameter(torch.zeros(len(c.grid), c.dim))
        self.register_buffer("levels", grid_positions(c)[2][1:], persistent=False)  # (length,)
        self.register_buffer("is_code", torch.arange(length) >= c.class_len, persistent=False)  # (length,)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i, causal=False) for i in range(c.depth))
        self.norm = norm_layer(c)
        self.head = None if c.tie_weights else nn.Linear(c.dim, c.codebook_size, bias=False)
        self._init_weights()

    # The AR prior's pieces that do not depend on causality, shared rather than copied.
    _init_weights = TransformerPrior._init_weights  # GPT-2's initialisation
    _drop_labels = TransformerPrior._drop_labels  # label dropout on [BOS, class, ...] rows (train mode)
    logits = TransformerPrior.logits  # hidden states (..., dim) -> code logits (..., K)
    prefix = TransformerPrior.prefix  # (n, prefix_len) batch prefixes [BOS, (class)] for labels

    # -- core ----------------------------------------------------------------------------------
    def hidden(self, seq: Tensor) -> Tensor:
        """seq (B, class_len + N) = [(class), codes or MASK] -> final hidden states (B, class_len + N, dim)."""
        c = self.config
        if seq.ndim != 2 or seq.shape[1] != c.class_len + c.seq_len:
            raise ValueError(f"expected a sequence (B, {c.class_len + c.seq_len}), got {tuple(seq.shape)}")
        x = self.embed(seq)  # (B, L, dim)
        rope = None
        if c.positions == "learned":
            x = x + self.pos_embed
        else:
            rope = (self.rope_cos, self.rope_sin)
            if len(c.grid) > 1:
                x = x + self.is_code[:, None] * self.level_embed[self.levels]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, None)
        return self.norm(x)

    def predict(self, seq: Tensor) -> Tensor:
        """seq (B, class_len + N) = [(class), codes or MASK] -> code logits (B, N, K) at every code position."""
        return self.logits(self.hidden(seq)[:, self.config.class_len :])

    def forward(self, tokens: Tensor, return_loss: bool = False) -> Tensor:
        """tokens (B, prefix_len + N) = [BOS, (class), codes or MASK], the AR prior's batch format ->
        code logits (B, N, K) of the tokens as given. `return_loss=True` returns `loss(tokens)`
        instead: the way to get the loss through a DDP wrapper (its gradient hooks need its forward)."""
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] != c.prefix_len + c.seq_len:
            raise ValueError(f"expected tokens (B, {c.prefix_len + c.seq_len}), got {tuple(tokens.shape)}")
        if not return_loss:
            return self.predict(tokens[:, 1:])
        seq = self._drop_labels(tokens)[:, 1:]  # (B, class_len + N): BOS dropped
        codes = seq[:, c.class_len :]  # (B, N)
        masked = self.draw_mask(codes.shape[0], codes.device)  # (B, N) bool
        inputs = torch.cat([seq[:, : c.class_len], codes.masked_fill(masked, c.mask)], dim=1)
        h = self.hidden(inputs)[:, c.class_len :]  # (B, N, dim)
        # Every position's loss, weighted by the mask: indexing with `masked` would give a
        # data-dependent size (a host-device sync per step); every row masks >= 1 code.
        smoothing = c.label_smoothing if self.training else 0.0  # validation scores the plain cross-entropy
        per_code = F.cross_entropy(self.logits(h).float().flatten(0, 1), codes.flatten(), reduction="none",
                                   label_smoothing=smoothing)  # (B·N,)
        weights = masked.flatten().float()  # (B·N,)
        return (per_code * weights).sum() / weights.sum()  # the mean over masked codes

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean cross-entropy in nats per masked code (bits = loss / ln 2); train mode adds label dropout."""
        return self(tokens, return_loss=True)

    def draw_mask(self, batch: int, device: torch.device) -> Tensor:
        """(batch, N) bool, True = masked: per row ceil(N * schedule(u)) random codes, u ~ U[0, 1).
        Train mode draws from torch's RNG on `device`; eval mode from a CPU generator seeded with
        EVAL_MASK_SEED (the same masks on any device, at every validation)."""
        n = self.config.seq_len
        generator = None if self.training else torch.Generator().manual_seed(EVAL_MASK_SEED)
        where = device if generator is None else torch.device("cpu")
        ratio = MASK_SCHEDULES[self.config.mask_schedule](torch.rand(batch, generator=generator, device=where))
        counts = torch.ceil(n * ratio).clamp(1, n)  # (batch,)
        ranks = torch.rand(batch, n, generator=generator, device=where).argsort(-1).argsort(-1)  # a random order
        return (ranks < counts[:, None]).to(device)

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, n: int, labels: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
        steps: int | None = None, use_cache: bool = True, dtype: torch.dtype | str | None = "auto",
    ) -> Tensor:
        """n code sequences (n, N) int64 on the model's device in `steps` parallel steps (None: the
        config's `sample_steps`). With labels and cfg_scale != 1, class-free guidance as the AR
        prior's. `use_cache` is accepted for the AR prior's signature and ignored (no KV cache
        applies); dtype: autocast dtype on CUDA ("auto" = bf16 where supported), fp32 on CPU."""
        c = self.config
        steps = c.sample_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        classes = self.prefix(n, labels)[:, 1:]  # (n, class_len)
        if cfg_scale != 1.0:
            if c.num_classes == 0 or labels is None:
                raise ValueError("cfg_scale != 1 needs a class-conditional prior and labels")
            classes = torch.cat([classes, self.prefix(n, None)[:, 1:]])  # (2n, 1): conditional, then null
        was_training = self.training
        self.eval()
        codes = torch.full((n, c.seq_len), c.mask, dtype=torch.long, device=classes.device)
        with sampling_autocast(codes.device, dtype):
            for step in range(steps):
                logits = self.guided_logits(classes, codes, cfg_scale)  # (n, N, K)
                codes = self._unmask_step(codes, logits, step, steps, (temperature, top_k, top_p), generator)
        self.train(was_training)
        return codes

    def guided_logits(self, classes: Tensor, codes: Tensor, cfg_scale: float = 1.0) -> Tensor:
        """Code logits (n, N, K) fp32 for codes (n, N) after class tokens `classes` (R, class_len):
        R = n, or 2n (conditional rows, then null rows: one batch) mixed as cond + (s - 1)(cond - uncond)."""
        n = codes.shape[0]
        logits = self.predict(torch.cat([classes, codes.repeat(classes.shape[0] // n, 1)], dim=1)).float()
        if classes.shape[0] == n:
            return logits
        cond, uncond = logits[:n], logits[n:]
        return cond + (cfg_scale - 1.0) * (cond - uncond)

    def _unmask_step(self, codes: Tensor, logits: Tensor, step: int, steps: int, filters: tuple,
                     generator: torch.Generator | None) -> Tensor:
        """One decoding step: codes (n, N) with MASK where unknown, their logits (n, N, K) -> codes
        (n, N) with the schedule's count of the least confident draws masked again.
        `filters` = (temperature, top_k, top_p) for `models.prior.sample_logits`."""
        c = self.config
        n, length = codes.shape
        unknown = codes == c.mask  # (n, N)
        drawn = sample_logits(logits.flatten(0, 1), *filters, generator=generator).view(n, length)
        drawn = torch.where(unknown, drawn, codes)
        # Confidence: the draw's log-probability under the unfiltered (guided) logits, plus annealed noise.
        confidence = logits.log_softmax(-1).gather(-1, drawn[..., None]).squeeze(-1)  # (n, N)
        noise_scale = c.choice_temperature * (1.0 - (step + 1) / steps)
        if noise_scale > 0:
            gumbel = -torch.empty_like(confidence).exponential_(generator=generator).log()  # (n, N)
            confidence = confidence + noise_scale * gumbel
        confidence = confidence.masked_fill(~unknown, float("inf"))  # a known code is never masked again
        keep = torch.clamp(unknown.sum(-1) - 1, max=masked_after(step, steps, length, c.mask_schedule))
        ranks = confidence.argsort(-1).argsort(-1)  # (n, N): 0 = least confident
        return drawn.masked_fill(ranks < keep.clamp(min=0)[:, None], c.mask)
