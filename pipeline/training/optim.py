"""What the engine optimises: one `Part` per trained module (the model; a VQGAN's discriminator).

A Part owns its AdamW, the learning-rate schedule (linear warm-up, cosine decay), gradient
clipping, the skip rule for NaN/inf or too large gradient norms (VDVAE) and, when
`ema_decay > 0`, EMA weights: the model that validation, samples and export use. The step
(`pipeline.training.step`) decides when to backward and when to update; a Part knows only its
own optimizer. Frozen parameters (`requires_grad=False`, `train.freeze`) are outside the
optimizer, the EMA copies them unchanged, and frozen parts stay in eval mode while the rest
trains. Nothing here knows about ranks or files.

The skip decision uses only the gradient norm: under DDP the gradients are all-reduced during
backward, so every rank computes the same norm and skips together, and a NaN/inf loss on any rank
makes the all-reduced gradients non-finite on every rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.models.freezing import frozen_modules


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 200.0  # max total grad norm; 0 disables clipping
    skip_grad_norm: float = 0.0  # skip updates whose grad norm exceeds this; 0 skips only NaN/inf
    ema_decay: float = 0.999  # 0 disables EMA weights
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    total_steps: int = 0  # cosine decay to lr·min_lr_ratio at total_steps; 0 keeps lr constant
    min_lr_ratio: float = 0.1

    __pydantic_config__ = {"extra": "forbid"}


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
                                           weight_decay=config.weight_decay)
        self.ema: nn.Module | None = None
        if config.ema_decay > 0:
            self.ema = copy.deepcopy(module).eval().requires_grad_(False)
        self.steps = 0  # optimizer steps taken or skipped: the position in the LR schedule
        self.skipped = 0  # of which updates were skipped
        self.updates = 0  # of which updates were applied (drives the EMA warm-up)
        self.lr = config.lr

    def start_step(self) -> None:
        """Set this step's learning rate (it follows the step count: identical on every rank),
        clear the gradients and enter train mode."""
        self.lr = self.config.lr * lr_factor(self.steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        for module in frozen_modules(self.module):  # train.freeze: a frozen quantizer must not learn
            module.eval()

    def finish_step(self, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        """Clip the accumulated gradients, then update (or skip on a NaN/inf or too large norm).
        Returns {grad_norm (before clipping), lr, skipped}."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip and judge the true gradients
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))  # the step's one host read
        skipped = not math.isfinite(grad_norm) or 0 < self.config.skip_grad_norm < grad_norm
        if skipped:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self._update_ema()
            self.updates += 1
        self.steps += 1
        return {"grad_norm": grad_norm, "lr": self.lr, "skipped": skipped}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # Warm-up (as TF's ExponentialMovingAverage): early weights are poor and a slow average
        # of them would lag far behind on short runs.
        decay = min(self.config.ema_decay, (1.0 + self.updates) / (10.0 + self.updates))
        for shadow, live in zip(self.ema.parameters(), self.module.parameters()):
            if live.requires_grad:
                shadow.lerp_(live.detach(), 1.0 - decay)
            else:  # frozen (train.freeze): copied, so the EMA's frozen parts stay bit-identical
                shadow.copy_(live)
        for shadow, live in zip(self.ema.buffers(), self.module.buffers()):
            shadow.copy_(live)

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
