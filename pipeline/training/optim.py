"""What the engine optimises: one `Part` per trained module (the model; a VQGAN's discriminator).

A Part owns its AdamW, the learning-rate schedule (linear warm-up, cosine decay), gradient
clipping, the skip rule for NaN/inf or too large gradient norms (VDVAE) and, when
`ema_decay > 0`, EMA weights: the model that validation, samples and export use. The step
(`pipeline.training.step`) decides when to backward and when to update; a Part knows only its
own optimizer. Nothing here knows about ranks or files.

The skip decision uses only the gradient norm: under DDP the gradients are all-reduced during
backward, so every rank computes the same norm and skips together, and a NaN/inf loss on any rank
makes the all-reduced gradients non-finite on every rank. It is made on the device, never read
back: AdamW is the fused one, whose kernel leaves weights, moments and step count alone when
`found_inf` is 1 (the protocol GradScaler uses; here it carries the skip rule), the EMA moves by a
weight that is 0 on a skipped step, and the counters are device tensors read only when logged or
checkpointed. A GPU step then never waits for the device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.models.ranges import STRICT, Count, Fraction, NonNegative, Positive, UnitInterval


@dataclass
class OptimConfig:
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    grad_clip: NonNegative = 200.0  # max total grad norm; 0 disables clipping
    skip_grad_norm: NonNegative = 0.0  # skip updates whose grad norm exceeds this; 0 skips only NaN/inf
    ema_decay: Fraction = 0.999  # 0 disables EMA weights
    warmup_steps: Count = 0  # linear warm-up from lr/warmup_steps to lr
    total_steps: Count = 0  # cosine decay to lr·min_lr_ratio at total_steps; 0 keeps lr constant
    min_lr_ratio: UnitInterval = 0.1

    __pydantic_config__ = STRICT


def lr_factor(step: int, config: OptimConfig) -> float:
    """Multiplier of `config.lr` at optimiser step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.total_steps <= config.warmup_steps:
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / (config.total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Part:
    """A trained module: `module` is the plain one (what EMA, validation and checkpoints see),
    `model` what the forward runs (DDP-wrapped when distributed, maybe compiled)."""

    def __init__(self, name: str, module: nn.Module, model: nn.Module, config: OptimConfig):
        self.name, self.module, self.model, self.config = name, module, model, config
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay, fused=True)
        self.ema: nn.Module | None = None
        if config.ema_decay > 0:
            self.ema = copy.deepcopy(module).eval().requires_grad_(False)
        self.steps = 0  # optimizer steps taken or skipped: the position in the LR schedule (host)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.skipped_tensor = torch.zeros((), dtype=torch.long, device=device)  # of which updates were skipped
        self.updates_tensor = torch.zeros((), dtype=torch.long, device=device)  # applied (drive the EMA warm-up)
        self.lr = config.lr

    @property
    def skipped(self) -> int:
        """Skipped updates so far (reads the device: for checkpoints and summaries, not every step)."""
        return int(self.skipped_tensor)

    @skipped.setter
    def skipped(self, value: int) -> None:
        self.skipped_tensor.fill_(value)

    @property
    def updates(self) -> int:
        """Applied updates so far (reads the device, as `skipped`)."""
        return int(self.updates_tensor)

    @updates.setter
    def updates(self, value: int) -> None:
        self.updates_tensor.fill_(value)

    def start_step(self) -> None:
        """Set this step's learning rate (it follows the step count: identical on every rank),
        clear the gradients and enter train mode."""
        self.lr = self.config.lr * lr_factor(self.steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()

    def finish_step(self, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        """Clip the accumulated gradients, then update, or skip on a NaN/inf or too large norm,
        all on the device. Returns {grad_norm (before clipping), lr, skipped}: grad_norm and
        skipped are device scalars, read only by a step that logs them."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip and judge the true gradients; update() reads its inf check
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # () on the device
        applied = torch.isfinite(grad_norm)
        if self.config.skip_grad_norm > 0:
            applied &= grad_norm <= self.config.skip_grad_norm
        self.optimizer.found_inf = (~applied).float()  # 1: the fused kernel skips this step
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self._update_ema(applied)
        self.skipped_tensor += ~applied
        self.updates_tensor += applied
        self.steps += 1
        return {"grad_norm": grad_norm, "lr": self.lr, "skipped": ~applied}

    @torch.no_grad()
    def _update_ema(self, applied: torch.Tensor) -> None:
        """Move the EMA weights toward the live ones when `applied` (a device bool); a skipped
        step moves them by a weight of exactly 0."""
        if self.ema is None:
            return
        # Warm-up (as TF's ExponentialMovingAverage): early weights are poor and a slow average
        # of them would lag far behind on short runs.
        updates = self.updates_tensor.float()
        decay = ((1.0 + updates) / (10.0 + updates)).clamp(max=self.config.ema_decay)
        weight = (1.0 - decay) * applied  # () float32
        for shadow, live in zip(self.ema.parameters(), self.module.parameters()):
            shadow.lerp_(live.detach(), weight.to(shadow.dtype))
        for shadow, live in zip(self.ema.buffers(), self.module.buffers()):
            shadow.copy_(torch.where(applied, live, shadow))

    def eval_module(self) -> nn.Module:
        """The module to validate, sample and export: EMA weights when enabled, else the live one."""
        return self.ema if self.ema is not None else self.module

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "steps": self.steps, "skipped": self.skipped, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.steps, self.skipped, self.updates = int(state["steps"]), int(state["skipped"]), int(state["updates"])
