"""What a prior's ranks measure and show: validation bits per token, and sample grids.

Validation: every rank scores its own share of the validation items (`data.val_batches`); the
sums (nats, code tokens) are all-reduced once, so every rank gets the same number and no item is
counted twice. The forward runs under the training precision's autocast; the loss itself is
computed in fp32 from the logits (the priors' `loss`). Sample grids are rank 0's alone: one row per class (or rows of unconditional
samples), decoded by the tokenizer that made the store.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from tokenmill.pipeline.training.precision import autocast

LN2 = math.log(2.0)


@torch.no_grad()
def bits_per_token(prior: torch.nn.Module, batches: Iterable[dict], device: torch.device,
                   precision: str = "fp32") -> float:
    """Mean cross-entropy in bits per code token over every rank's `batches` (the split's items),
    the forward under `precision`'s autocast. A MaskGIT prior's `loss` is per masked code (its
    eval-mode masks are seeded, so this is comparable across steps), weighted here by each
    batch's code tokens. Sums stay on the device: one read at the end."""
    was_training = prior.training
    prior.eval()  # no label dropout: every sequence is scored with its own class
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, code tokens
    for batch in batches:
        tokens = batch["tokens"].to(device)  # (B, prefix + N)
        code_tokens = tokens.shape[0] * (tokens.shape[1] - prior.config.prefix_len)
        with autocast(precision, device):
            loss = prior.loss(tokens)  # fp32 scalar
        totals[0] += loss.double() * code_tokens
        totals[1] += code_tokens
    prior.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1) / LN2)


@torch.no_grad()
def sample_grid(prior: torch.nn.Module, tokenizer: torch.nn.Module, sample, seed: int, path: Path) -> Path:
    """Sample `sample.per_class` sequences per class (`sample`: the config's sample section; an
    unconditional prior gets `sample.rows` rows), decode them with `tokenizer` (`tokenmill sample`'s
    own steps) and write one PNG row per class at `path`."""
    from tokenmill.pipeline.grids import save_png_grid
    from tokenmill.pipeline.prior.sampling import SampleOptions, codes_to_images, draw_codes, sample_labels

    was_training = prior.training
    prior.eval()
    config = prior.config
    labels = sample_labels(config, None, sample.per_class)  # None when unconditional
    options = SampleOptions(cfg_scale=sample.cfg_scale if labels is not None else 1.0,
                            temperature=sample.temperature, top_k=sample.top_k, seed=seed)
    device = next(prior.parameters()).device
    codes = draw_codes(prior, labels, options, device, n=sample.per_class * sample.rows)  # (n, N) on CPU
    prior.train(was_training)
    images = codes_to_images(tokenizer, codes, config.grid)  # (n, C, H, W)
    return save_png_grid(images, path, nrow=sample.per_class)
