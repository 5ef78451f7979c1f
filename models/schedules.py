"""KL weight (β) schedules the training loop calls once per step, and free bits for the loss.

`KLSchedule(kind="constant", beta=4.0)` is a β-VAE; "linear" warms β up from 0 over
`warmup_steps`; "cyclical" repeats a ramp from 0 to β over the first `ramp_ratio` of every
`cycle_steps` and holds β for the rest (Fu et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokenmill.models.ranges import STRICT, Count, NonNegative, PositiveInt, UnitInterval


@dataclass
class KLSchedule:
    kind: Literal["constant", "linear", "cyclical"] = "constant"
    beta: NonNegative = 1.0
    warmup_steps: Count = 0
    cycle_steps: PositiveInt = 1000
    ramp_ratio: UnitInterval = 0.5

    __pydantic_config__ = STRICT

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.beta
        if self.kind == "linear":
            if self.warmup_steps <= 0:
                return self.beta
            return self.beta * min(1.0, step / self.warmup_steps)
        if self.kind == "cyclical":
            ramp = max(1.0, self.ramp_ratio * self.cycle_steps)
            return self.beta * min(1.0, (step % self.cycle_steps) / ramp)
        raise ValueError(f"unknown KL schedule kind {self.kind!r}")


def free_bits_rate(kl_units: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Rate term for the loss with free bits (Kingma et al. 2016): Σ_u max(λ, E_batch KL_u).

    kl_units: (B, U) KL per latent unit (a latent dim, or a latent channel of a group).
    Units below λ nats get no gradient, so the encoder is free to use them. The reported
    rate and ELBO never go through this function.
    """
    mean_kl = kl_units.mean(0)  # (U,)
    if free_bits <= 0.0:
        return mean_kl.sum()
    return torch.clamp(mean_kl, min=free_bits).sum()
