"""The optimisation step shared by the demo, the benchmarks and the distributed trainer.

`TrainStep(model, OptimConfig(...)).step(x, y, kl_weight=β)` runs forward, backward, AdamW with
warm-up + cosine learning rate, gradient clipping, and keeps EMA weights for evaluation.
An update is skipped (and counted) when the gradient norm is NaN/inf or above
`skip_grad_norm` (VDVAE). The decision uses only the gradient norm: under DDP the gradients
are all-reduced during backward, so every rank computes the same norm and skips together; a
NaN/inf loss on any rank makes the all-reduced gradients non-finite on every rank. Nothing
here knows about ranks or files.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainStep:
    """Owns the optimizer, EMA copy and step counters (which drive the LR schedule) of one model.

    `model` may be DDP-wrapped; the EMA copy shadows the unwrapped module (`model.module`) and is
    a plain module in eval mode, usable directly for evaluation and saving. `precision` bf16/fp16
    runs the forward (only) under autocast; backward follows the forward's dtypes and the
    optimizer steps fp32 weights. fp16 adds a GradScaler (bf16 has fp32's range and needs none).
    """

    def __init__(self, model: nn.Module, config: OptimConfig, precision: str = "fp32"):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        self.model = model
        self.config = config
        self.precision = precision
        self.module = getattr(model, "module", model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
        )
        self.ema: nn.Module | None = None
        if config.ema_decay > 0:
            self.ema = copy.deepcopy(self.module).eval().requires_grad_(False)
        self.steps = 0  # calls to step()
        self.skipped = 0  # of which updates were skipped
        self.updates = 0  # of which updates were applied (drives the EMA warm-up)
        device = next(iter(self.params)).device if self.params else torch.device("cpu")
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def _autocast(self):
        dtype = AUTOCAST_DTYPES[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device_type, dtype=dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None, **forward_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """One forward/backward/update. Returns (model output, stats: loss, grad_norm, lr, skipped)."""
        lr = self.start_step()
        with self._autocast():  # the forward only: backward and the optimizer step stay outside
            output = self.model(x, y, **forward_kwargs)
        return output, self.apply(output.loss, lr)

    def start_step(self) -> float:
        """Set this step's learning rate (it follows calls: identical on every rank) and train mode."""
        lr = self.config.lr * lr_factor(self.steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        return lr

    def apply(self, loss: torch.Tensor, lr: float) -> dict[str, Any]:
        """Backward `loss`, clip, then update (or skip on a NaN/inf or too large gradient norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        # Always backward: skipping it on one DDP rank would hang the others.
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip and judge the true gradients
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)  # norm before clipping
        # One device read per step for both numbers (the skip decision needs the norm on the host).
        grad_norm, loss_value = torch.stack([norm.float(), loss.detach().float()]).tolist()
        too_large = 0 < self.config.skip_grad_norm < grad_norm
        skipped = not math.isfinite(grad_norm) or too_large
        if skipped:
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self._update_ema()
            self.updates += 1
        if self.scaler:
            self.scaler.update()  # an inf/NaN step lowers the scale, so fp16 recovers
        self.steps += 1
        return {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, "skipped": skipped}

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # Warm-up (as TF's ExponentialMovingAverage): early weights are poor and a slow average
        # of them would lag far behind on short runs.
        decay = min(self.config.ema_decay, (1.0 + self.updates) / (10.0 + self.updates))
        for shadow, live in zip(self.ema.parameters(), self.module.parameters()):
            shadow.lerp_(live.detach(), 1.0 - decay)
        for shadow, live in zip(self.ema.buffers(), self.module.buffers()):
            shadow.copy_(live)

    def eval_model(self) -> nn.Module:
        """The module to evaluate: EMA weights when enabled, else the live (unwrapped) module."""
        return self.ema if self.ema is not None else self.module

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "steps": self.steps,  # also the position in the learning-rate schedule
            "skipped": self.skipped,
            "updates": self.updates,
            **({"scaler": self.scaler.state_dict()} if self.scaler else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.steps = int(state["steps"])
        self.skipped = int(state["skipped"])
        self.updates = int(state["updates"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
