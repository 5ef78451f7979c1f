"""An autoregressive Transformer prior over a tokenizer's codes (VQ-VAE's PixelCNN prior, taming's
GPT, LlamaGen's class-to-image GPT), in one readable file in the spirit of nanoGPT's `model.py`.

Vocabulary = `pipeline.tokens.dataset.TokenDataset(add_bos=True, class_token=C > 0, num_classes=C)`:
codes [0, K), BOS = K, class tokens K + 1 + label, the "no class" (null) token K + 1 + C.
A sequence is `[BOS, (class), c_0 .. c_{N-1}]` (prefix_len = 1 + (C > 0)); the codes are the
levels' grids in raster order, concatenated in store order (VQ-VAE-2: top, then bottom).

Positions:
- "learned": one learned vector per sequence index (prefix included), added to the embedding.
- "rope2d": 2D rotary embedding inside attention, LlamaGen-style: half of each head's rotation
  pairs turn with the code's row in its level's grid, the other half with its column. Prefix
  tokens sit at row 0, column 0 (identity rotation, as LlamaGen's class tokens). With several
  levels, a learned per-level vector is added to code embeddings so equal (row, col) of two
  levels stay distinguishable.

Class-free guidance (Ho & Salimans): `loss` in train mode swaps the class token for the null
token with probability `label_dropout`; `sample` runs conditional and null rows as one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenmill.models.ranges import STRICT, Count, Fraction, Positive, PositiveInt
from tokenmill.models.serialization import register_model


@dataclass
class PriorConfig:
    kind: Literal["prior"] = "prior"
    codebook_size: PositiveInt = 512  # K
    num_classes: Count = 0  # C; 0 = unconditional (no class token)
    grid: list[list[int]] = field(default_factory=lambda: [[8, 8]])  # (h, w) per level, store order
    dim: PositiveInt = 256
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    mlp_ratio: Positive = 4.0
    positions: Literal["learned", "rope2d"] = "rope2d"
    rope_base: Positive = 100.0  # grids are small: a low base spreads the angles over few positions
    label_dropout: Fraction = 0.1
    dropout: Fraction = 0.0
    tie_weights: bool = True  # output head = the code rows of the input embedding
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"

    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        self.grid = [[int(h), int(w)] for h, w in self.grid]  # JSON/YAML give lists or tuples back
        for name in ("codebook_size", "dim", "depth", "heads", "mlp_ratio", "rope_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_classes < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"num_classes must be >= 0 and dropout in [0, 1), got {self.num_classes}, {self.dropout}")
        if self.dim % self.heads:
            raise ValueError(f"prior dim {self.dim} must be divisible by heads {self.heads}")
        if self.positions == "rope2d" and (self.dim // self.heads) % 4:
            raise ValueError(f"rope2d needs a head size divisible by 4, got {self.dim // self.heads}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")

    @property
    def prefix_len(self) -> int:
        return 1 + (self.num_classes > 0)

    @property
    def seq_len(self) -> int:  # N, code tokens per sample
        return sum(h * w for h, w in self.grid)

    @property
    def bos(self) -> int:
        return self.codebook_size

    @property
    def class_offset(self) -> int:
        return self.codebook_size + 1

    @property
    def null_class(self) -> int:
        return self.class_offset + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + (self.num_classes + 1 if self.num_classes > 0 else 0)

    def vocab(self) -> dict[str, int]:
        """The token layout, as recorded in a prior's lineage."""
        return {"codebook_size": self.codebook_size, "bos": self.bos, "class_offset": self.class_offset,
                "num_classes": self.num_classes, "null_class": self.null_class}


# -- positions ---------------------------------------------------------------------------------
def grid_positions(config: PriorConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Row, column and level of every sequence index: three int64 (prefix_len + N,) tensors.
    Prefix tokens get row 0, column 0, level 0."""
    prefix = torch.zeros(config.prefix_len, dtype=torch.long)
    rows, cols, levels = [prefix], [prefix], [prefix]
    for level, (h, w) in enumerate(config.grid):
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(r.reshape(-1))
        cols.append(c.reshape(-1))
        levels.append(torch.full((h * w,), level, dtype=torch.long))
    return torch.cat(rows), torch.cat(cols), torch.cat(levels)


def rope2d_angles(config: PriorConfig) -> Tensor:
    """(prefix_len + N, head_dim / 2) rotation angles: the first half of the pairs turn with
    the row, the second half with the column, at frequencies base^(-j / (head_dim / 4))."""
    quarter = config.dim // config.heads // 4
    freqs = config.rope_base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (hd/4,)
    rows, cols, _ = grid_positions(config)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (L, hd/2)
    return angles.float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of x (B, H, T, hd) by angles whose cos/sin are (T, hd/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, hd/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


# -- the KV cache ------------------------------------------------------------------------------
class KVCache:
    """Per-layer keys/values (B, H, max_len, hd), filled left to right; `length` tokens are in."""

    def __init__(self, depth: int, max_len: int):
        self.keys: list[Tensor | None] = [None] * depth
        self.values: list[Tensor | None] = [None] * depth
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, hd) at [length, length + T); returns every key/value so far."""
        if self.keys[layer] is None:  # allocated on first use, in the dtype autocast produced
            shape = (*k.shape[:2], self.max_len, k.shape[-1])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# -- the Transformer ---------------------------------------------------------------------------
def norm_layer(config: PriorConfig) -> nn.Module:
    return nn.RMSNorm(config.dim) if config.norm == "rmsnorm" else nn.LayerNorm(config.dim)


class CausalSelfAttention(nn.Module):
    """Causal self-attention; `causal=False` makes it bidirectional (MaskGIT: every token sees
    every other, no KV cache)."""

    def __init__(self, config: PriorConfig, layer: int, causal: bool = True):
        super().__init__()
        self.heads, self.layer, self.dropout, self.causal = config.heads, layer, config.dropout, causal
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None,
                mask: Tensor | None = None) -> Tensor:
        """x: (B, T, dim) at sequence indices [start, start + T) (start = cache.length or 0).
        `mask` (T, start + T) bool, True = may attend, replaces the causal mask (VAR's blocks)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        start = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, start + T, hd)
        t = q.shape[2]
        if mask is not None:  # the caller's own pattern (VAR's block-causal)
            causal = False
        elif not self.causal:  # bidirectional (MaskGIT): no mask at all
            mask, causal = None, False
        elif start == 0:  # square: the usual causal mask
            mask, causal = None, True
        elif t == 1:  # one new token (sampling): it sees every cached key
            mask, causal = None, False
        else:  # query i at index start + i sees keys [0, start + i]
            mask = torch.arange(k.shape[2], device=x.device)[None] <= start + torch.arange(t, device=x.device)[:, None]
            causal = False
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).flatten(2))  # (B, T, dim)


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PriorConfig, layer: int, causal: bool = True):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.norm1, self.norm2 = norm_layer(config), norm_layer(config)
        self.attn = CausalSelfAttention(config, layer, causal)
        self.mlp = nn.Sequential(nn.Linear(config.dim, hidden, bias=False), nn.GELU(),
                                 nn.Linear(hidden, config.dim, bias=False))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None,
                mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


@register_model
class TransformerPrior(nn.Module):
    """Causal Transformer over `[BOS, (class), codes]`; see the module docstring for the layout."""

    config_class = PriorConfig

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        total = c.prefix_len + c.seq_len
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        if c.positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(total, c.dim))
        else:
            angles = rope2d_angles(c)  # (L, hd/2); buffers are rebuilt, not saved
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
            if len(c.grid) > 1:
                self.level_embed = nn.Parameter(torch.zeros(len(c.grid), c.dim))
        self.register_buffer("levels", grid_positions(c)[2], persistent=False)  # (L,)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.depth))
        self.norm = norm_layer(c)
        self.head = None if c.tie_weights else nn.Linear(c.dim, c.codebook_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        init_gpt2_weights(self, self.config.depth)
        if self.config.positions == "learned":
            nn.init.normal_(self.pos_embed, std=0.02)

    # -- core ----------------------------------------------------------------------------------
    def hidden(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) at sequence indices [start, start + T) -> final hidden states (B, T, dim);
        start = cache.length (then the cache advances by T) or 0 without a cache."""
        c = self.config
        start = 0 if cache is None else cache.length
        end = start + tokens.shape[1]
        if end > c.prefix_len + c.seq_len:
            raise ValueError(f"sequence of {end} tokens is longer than prefix + codes = {c.prefix_len + c.seq_len}")
        x = self.embed(tokens)  # (B, T, dim)
        rope = None
        if c.positions == "learned":
            x = x + self.pos_embed[start:end]
        else:
            rope = (self.rope_cos[start:end], self.rope_sin[start:end])
            if len(c.grid) > 1:
                is_code = torch.arange(start, end, device=x.device) >= c.prefix_len  # (T,)
                x = x + is_code[:, None] * self.level_embed[self.levels[start:end]]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.length = end
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """Hidden states (..., dim) -> logits over codes only (..., K)."""
        if self.head is not None:
            return self.head(h)
        return h @ self.embed.weight[: self.config.codebook_size].t()

    def forward(self, tokens: Tensor, return_loss: bool = False) -> Tensor:
        """tokens (B, prefix_len + N) -> logits (B, N, K); logits[:, t] predict code t from the
        input positions prefix_len - 1 .. L - 2 (the last token is never an input).
        `return_loss=True` returns `loss(tokens)` instead: the way to get the loss through a DDP
        wrapper (`ddp(tokens, return_loss=True)`), whose gradient hooks need its own forward."""
        c = self.config
        if tokens.ndim != 2 or tokens.shape[1] != c.prefix_len + c.seq_len:
            raise ValueError(f"expected tokens (B, {c.prefix_len + c.seq_len}), got {tuple(tokens.shape)}")
        if return_loss:
            tokens = self._drop_labels(tokens)
        h = self.hidden(tokens[:, :-1])  # (B, L - 1, dim)
        logits = self.logits(h[:, c.prefix_len - 1 :])  # (B, N, K)
        if not return_loss:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, c.prefix_len :].flatten())

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean cross-entropy in nats per code token (bits = loss / ln 2). In train mode the class
        token is replaced by the null token with probability `label_dropout`."""
        return self(tokens, return_loss=True)

    def _drop_labels(self, tokens: Tensor) -> Tensor:
        return drop_labels(tokens, self.config, self.training)

    # -- sampling ------------------------------------------------------------------------------
    def prefix(self, n: int, labels: Tensor | None) -> Tensor:
        """(n, prefix_len) prefixes: BOS, then the class token (null where labels is None or -1)."""
        return prefix_tokens(self.config, n, labels, self.embed.weight.device)

    @torch.no_grad()
    def sample(
        self, n: int, labels: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
        use_cache: bool = True, dtype: torch.dtype | str | None = "auto",
    ) -> Tensor:
        """n code sequences (n, N) int64 on the model's device. With labels and cfg_scale != 1,
        class-free guidance: logits = uncond + s (cond - uncond). dtype: autocast dtype on CUDA
        ("auto" = bf16 where supported, else fp16; None = fp32); CPU always runs fp32."""
        cond = self.prefix(n, labels)
        null = None
        if cfg_scale != 1.0:
            if self.config.num_classes == 0 or labels is None:
                raise ValueError("cfg_scale != 1 needs a class-conditional prior and labels")
            null = self.prefix(n, None)
        return self.generate(cond, null, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=generator, use_cache=use_cache, dtype=dtype)

    @torch.no_grad()
    def generate(
        self, cond: Tensor, null: Tensor | None = None, *, cfg_scale: float = 1.0, temperature: float = 1.0,
        top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
        use_cache: bool = True, dtype: torch.dtype | str | None = "auto",
    ) -> Tensor:
        """Codes (n, N) after the prefixes `cond` (n, P); with `null` (n, P) the conditional and
        null rows run as one batch of 2n and their logits mix as cond + (s - 1)(cond - uncond)
        (= uncond + s (cond - uncond), exactly cond at s = 1)."""
        c = self.config
        was_training = self.training
        self.eval()
        n = cond.shape[0]
        seq = cond if null is None else torch.cat([cond, null])  # (R, P), R = n or 2n
        cache = KVCache(c.depth, c.prefix_len + c.seq_len) if use_cache else None
        step_input = seq  # with the cache: only the tokens it has not seen
        codes = []
        with sampling_autocast(seq.device, dtype):
            for _ in range(c.seq_len):
                h = self.hidden(step_input if use_cache else seq, cache)[:, -1]  # (R, dim)
                logits = self.logits(h).float()  # (R, K)
                if null is not None:
                    logits = logits[:n] + (cfg_scale - 1.0) * (logits[:n] - logits[n:])
                code = sample_logits(logits, temperature, top_k, top_p, generator)  # (n,)
                codes.append(code)
                step_input = code.repeat(seq.shape[0] // n)[:, None]  # (R, 1)
                if not use_cache:
                    seq = torch.cat([seq, step_input], dim=1)
        self.train(was_training)
        return torch.stack(codes, dim=1)  # (n, N)


# -- pieces every prior kind shares (models/var_prior.py too) ----------------------------------
def init_gpt2_weights(model: nn.Module, depth: int) -> None:
    """GPT-2: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 depth)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
    for block in model.modules():
        if isinstance(block, Block):
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))


def drop_labels(tokens: Tensor, config: PriorConfig, training: bool) -> Tensor:
    """tokens (B, prefix_len + N) with the class token (index 1) swapped for the null token with
    probability `label_dropout`, in training only (classifier-free guidance)."""
    c = config
    if not (training and c.num_classes > 0 and c.label_dropout > 0):
        return tokens
    drop = torch.rand(tokens.shape[0], device=tokens.device) < c.label_dropout  # (B,)
    tokens = tokens.clone()
    tokens[:, 1] = torch.where(drop, c.null_class, tokens[:, 1])
    return tokens


def prefix_tokens(config: PriorConfig, n: int, labels: Tensor | None, device: torch.device) -> Tensor:
    """(n, prefix_len) prefixes: BOS, then the class token (null where labels is None or -1)."""
    c = config
    bos = torch.full((n, 1), c.bos, dtype=torch.long, device=device)
    if c.num_classes == 0:
        if labels is not None:
            raise ValueError("this prior is unconditional (num_classes = 0); sample it without labels")
        return bos
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.shape[0] != n or labels.max() >= c.num_classes or labels.min() < -1:
        raise ValueError(f"labels must be {n} class ids in [0, {c.num_classes}) (or -1 for none)")
    classes = torch.where(labels >= 0, c.class_offset + labels, c.null_class)
    return torch.cat([bos, classes[:, None]], dim=1)


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One draw per row of logits (B, K) -> (B,) int64, after temperature, top-k and nucleus
    (top-p: the smallest set of most likely codes whose probability reaches p) filtering."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of better codes
        remove = before >= top_p  # the best code always stays (its `before` is 0)
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_autocast(device: torch.device, dtype: torch.dtype | str | None):
    """Autocast for sampling: `dtype` on CUDA ("auto" = bf16 where supported, else fp16), fp32 elsewhere."""
    if device.type != "cuda" or dtype is None:
        return torch.autocast(device.type, enabled=False)
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
