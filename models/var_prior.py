"""A VAR prior (Tian et al. 2024, "Visual Autoregressive Modeling"): next-scale prediction over
a multi-scale residual tokenizer's codes, one Transformer pass per scale.

Levels = scales. The store holds one level per scale, coarse to fine (`grid` [[1, 1], [2, 2],
..., [8, 8]]: square, strictly growing), all from one codebook of K codes.

Vocabulary and batch: exactly the AR prior's (`models.prior`, `PriorConfig.vocab()`): codes
[0, K), BOS = K, class tokens K + 1 + label, the null class K + 1 + C. A batch is
`[BOS, (class), codes of scale 0, codes of scale 1, ...]` (B, prefix_len + N), each scale in
raster order. The "start token" is the last prefix token: the class (or null) token of a
conditional prior, BOS of an unconditional one; BOS is otherwise ignored.

The Transformer's input has N positions, one per code, in blocks of scales. Block s's inputs
(h_s * w_s of them) predict scale s's codes:
  - block 0: the start token's embedding, the same vector at every position of scale 0;
  - block s >= 1: the accumulated feature of the coarser scales at scale s's size,
        sum over t < s of interpolate(E[codes_t] as a (dim, h_t, w_t) map, (h_s, w_s)),
    with E the code rows of the token embedding and `interpolation` bilinear (align_corners
    False) or nearest. Each coarser scale is resized straight to scale s (no detour through
    the finest grid).
Every input gets a learned scale embedding plus its position: a learned vector per position
("learned", the default, as VAR) or 2D rotary angles from the row and column in its own scale's
grid ("rope2d", as the AR prior's). Attention is block-causal: block s attends to blocks <= s
(the start token is block 0), so the logits of scale s depend on the codes of scales < s only.

Sampling: one pass per scale, all of the scale's codes drawn at once from its logits; with the
KV cache each pass feeds only the new scale's inputs (the cache holds the coarser blocks'
keys/values), without it every pass reruns all blocks so far. Classifier-free guidance runs the
conditional and null start tokens as one batch; training swaps the class token for the null
token with probability `label_dropout`. Its scale grows with the scale index (`cfg_schedule`
"linear", as VAR's sampler): 1 (plain conditional) at the 1x1 scale up to `cfg_scale` at the
finest, because guiding the coarsest codes, which set a digit's overall ink, extrapolates them
past the data (blank or blotted digits); "constant" guides every scale alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.prior import (
    Block,
    KVCache,
    PriorConfig,
    TransformerPrior,
    drop_labels,
    init_gpt2_weights,
    norm_layer,
    rope2d_angles,
    sample_logits,
    sampling_autocast,
)
from tokenmill.models.ranges import STRICT
from tokenmill.models.serialization import register_model

MULTISCALE_HINT = "tokenize with a multi-scale tokenizer (quantizer kind multiscale)"


@dataclass
class VARConfig(PriorConfig):
    kind: Literal["var"] = "var"  # type: ignore[assignment]
    grid: list[list[int]] = field(default_factory=lambda: [[1, 1], [2, 2], [3, 3], [4, 4], [6, 6], [8, 8]])
    positions: Literal["learned", "rope2d"] = "learned"
    interpolation: Literal["bilinear", "nearest"] = "bilinear"  # coarser scales -> scale s's size
    cfg_schedule: Literal["linear", "constant"] = "linear"  # guidance per scale (module docstring)

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        super().__post_init__()
        levels = ", ".join(f"{h}x{w}" for h, w in self.grid)
        if len(self.grid) < 2:
            raise ValueError("a VAR prior needs a multi-scale store (levels = scales, coarse to fine); this store "
                             f"has one level {levels}: {MULTISCALE_HINT}")
        sides = [h for h, _ in self.grid]
        if any(h != w for h, w in self.grid) or any(a >= b for a, b in zip(sides, sides[1:])):
            raise ValueError("a VAR prior needs square scales growing coarse to fine (levels = scales); this store "
                             f"has levels {levels}: {MULTISCALE_HINT}")


@register_model
class VARPrior(nn.Module):
    """Next-scale prediction over `[BOS, (class), codes]`; see the module docstring for the layout."""

    config_class = VARConfig

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = c = config
        self.sizes = [h * w for h, w in c.grid]  # codes per scale
        scales = torch.repeat_interleave(torch.arange(len(c.grid)), torch.tensor(self.sizes))  # (N,)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("block_mask", scales[None, :] <= scales[:, None], persistent=False)  # (N, N)
        self.embed = nn.Embedding(c.vocab_size, c.dim)  # codes, BOS, classes, null
        self.scale_embed = nn.Parameter(torch.zeros(len(c.grid), c.dim))
        if c.positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(c.seq_len, c.dim))
        else:
            angles = rope2d_angles(c)[c.prefix_len :]  # (N, hd/2): row/col within each scale's grid
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.depth))
        self.norm = norm_layer(c)
        self.head = None if c.tie_weights else nn.Linear(c.dim, c.codebook_size, bias=False)
        init_gpt2_weights(self, c.depth)
        nn.init.normal_(self.scale_embed, std=0.02)
        if c.positions == "learned":
            nn.init.normal_(self.pos_embed, std=0.02)

    # -- inputs --------------------------------------------------------------------------------
    def code_map(self, codes: Tensor, scale: int) -> Tensor:
        """One scale's codes (B, h * w) -> their embeddings as a map (B, dim, h, w)."""
        h, w = self.config.grid[scale]
        return self.embed(codes).transpose(1, 2).unflatten(2, (h, w))

    def scale_input(self, start: Tensor, maps: list[Tensor], scale: int) -> Tensor:
        """Block `scale`'s inputs (B, h * w, dim) from the start embeddings (B, dim) and the code
        maps of the coarser scales (`maps[t]` (B, dim, h_t, w_t), t < scale)."""
        h, w = self.config.grid[scale]
        if scale == 0:
            return start[:, None].expand(-1, h * w, -1)
        mode = self.config.interpolation
        options = {"align_corners": False} if mode == "bilinear" else {}
        accumulated = sum(F.interpolate(m, size=(h, w), mode=mode, **options) for m in maps[:scale])
        return accumulated.flatten(2).transpose(1, 2)  # (B, h * w, dim)

    def inputs(self, start_tokens: Tensor, codes: Tensor) -> Tensor:
        """Start tokens (B,) and codes (B, N) -> every block's inputs (B, N, dim)."""
        start = self.embed(start_tokens)  # (B, dim)
        coarser = codes.split(self.sizes, dim=1)[:-1]  # the finest scale is never an input
        maps = [self.code_map(part, s) for s, part in enumerate(coarser)]
        return torch.cat([self.scale_input(start, maps, s) for s in range(len(self.sizes))], dim=1)

    # -- core ----------------------------------------------------------------------------------
    def hidden(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Inputs x (B, T, dim) at positions [start, start + T) -> final hidden states (B, T, dim);
        start = cache.length (then the cache advances by T) or 0 without a cache."""
        c = self.config
        start = 0 if cache is None else cache.length
        end = start + x.shape[1]
        if end > c.seq_len:
            raise ValueError(f"{end} inputs are more than the {c.seq_len} codes of grid {c.grid}")
        x = x + self.scale_embed[self.scales[start:end]]
        rope = None
        if c.positions == "learned":
            x = x + self.pos_embed[start:end]
        else:
            rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        mask = self.block_mask[start:end, :end]  # (T, end): block s sees blocks <= s
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.length = end
        return self.norm(x)

    logits = TransformerPrior.logits  # hidden states (..., dim) -> logits over codes only (..., K)

    def forward(self, tokens: Tensor, return_loss: bool = False) -> Tensor:
        """tokens (B, prefix_len + N) (the AR prior's batch) -> logits (B, N, K), position t
        predicting code t from the coarser scales; `return_loss=True` returns `loss(tokens)`
        (the way through a DDP wrapper)."""
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] != c.prefix_len + c.seq_len:
            raise ValueError(f"expected tokens (B, {c.prefix_len + c.seq_len}), got {tuple(tokens.shape)}")
        if return_loss:
            tokens = drop_labels(tokens, c, self.training)
        codes = tokens[:, c.prefix_len :]  # (B, N)
        logits = self.logits(self.hidden(self.inputs(tokens[:, c.prefix_len - 1], codes)))  # (B, N, K)
        if not return_loss:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean cross-entropy in nats per code token (label dropout in train mode)."""
        return self(tokens, return_loss=True)

    # -- sampling ------------------------------------------------------------------------------
    prefix = TransformerPrior.prefix  # (n, prefix_len) prefixes: BOS, then the class (or null) token

    @torch.no_grad()
    def sample(
        self, n: int, labels: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
        use_cache: bool = True, dtype: torch.dtype | str | None = "auto",
    ) -> Tensor:
        """n code sequences (n, N) int64, one pass per scale. With labels and cfg_scale != 1,
        logits = uncond + s (cond - uncond), s per scale from `cfg_scale` by the config's
        `cfg_schedule` (`guidance_scales`). (No `steps`: MaskGIT's option; `tokenmill sample --steps`
        on a VAR prior is refused by `pipeline.prior.sampling`.)"""
        start = self.prefix(n, labels)[:, -1]  # (n,) class, null or BOS
        if cfg_scale != 1.0:
            if self.config.num_classes == 0 or labels is None:
                raise ValueError("cfg_scale != 1 needs a class-conditional prior and labels")
            start = torch.cat([start, self.prefix(n, None)[:, -1]])  # (2n,): conditional, then null rows
        was_training = self.training
        self.eval()
        with sampling_autocast(start.device, dtype):
            codes = self._draw_scales(start, n, cfg_scale, (temperature, top_k, top_p, generator), use_cache)
        self.train(was_training)
        return codes

    def _draw_scales(self, start: Tensor, n: int, cfg_scale: float, draw: tuple, use_cache: bool) -> Tensor:
        """Codes (n, N) scale by scale from start tokens (R,) (R = n, or 2n: conditional + null)."""
        rows = start.shape[0]
        cache = KVCache(self.config.depth, self.config.seq_len) if use_cache else None
        start_embedding, maps, inputs, codes = self.embed(start), [], [], []  # (R, dim)
        guidance = guidance_scales(cfg_scale, len(self.sizes), self.config.cfg_schedule)
        for scale, size in enumerate(self.sizes):
            x = self.scale_input(start_embedding, maps, scale)  # (R, size, dim)
            inputs.append(x)
            h = self.hidden(x, cache) if use_cache else self.hidden(torch.cat(inputs, dim=1))[:, -size:]
            logits = self.logits(h).float()  # (R, size, K)
            if rows > n:
                logits = logits[:n] + (guidance[scale] - 1.0) * (logits[:n] - logits[n:])
            code = sample_logits(logits.flatten(0, 1), *draw).view(n, size)  # (n, size)
            codes.append(code)
            maps.append(self.code_map(code.repeat(rows // n, 1), scale))  # the same codes for null rows
        return torch.cat(codes, dim=1)  # (n, N)


def guidance_scales(cfg_scale: float, scales: int, schedule: str) -> list[float]:
    """The guidance of each of `scales` scales: "constant" `cfg_scale` at every one; "linear" from
    1 (no guidance) at the coarsest to `cfg_scale` at the finest."""
    if schedule == "constant":
        return [cfg_scale] * scales
    return [1.0 + (cfg_scale - 1.0) * s / (scales - 1) for s in range(scales)]
