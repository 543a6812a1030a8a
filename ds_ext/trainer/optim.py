"""Optimizers (``optimizer: {name: sgd|adamw|adam, lr: <peak>, ...}``) and the learning-rate schedule.

The schedule follows the QSR seed's ``xscheduler.py``: linear warm-up from ``min_lr`` to the peak
``lr`` over the warm-up steps, then

* ``cosine``:  eta = eta_min + 1/2 (eta_max - eta_min) (1 + cos(pi t'/T')),  T' = total - warmup
* ``linear``:  eta = eta_max + (eta_min - eta_max) t'/T'
* ``step``:    eta = eta_max * gamma^(number of decay points passed)  (decay points in epochs)
* ``constant``: eta = eta_max

``lr_at(step)`` is a pure function, so the QSR period schedule can be computed without training.
"""
from __future__ import annotations

import math
from typing import Annotated, List, Tuple

import torch
from pydantic import Field, model_validator

from ..registry import OPTIMIZERS, Options


class SGDOptions(Options):
    lr: float = Field(..., gt=0, description="peak learning rate")
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    no_decay_on_bias_and_norm: bool = Field(False, description="weight decay 0 for 1-D parameters")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov: true needs momentum > 0 (torch.optim.SGD refuses it otherwise)")
        return self


class AdamOptions(Options):
    lr: float = Field(..., gt=0, description="peak learning rate")
    betas: Tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    no_decay_on_bias_and_norm: bool = False


def _groups(params, options) -> List[dict]:
    params = [p for p in params if p.requires_grad]
    if not options.no_decay_on_bias_and_norm:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


@OPTIMIZERS.register("sgd", SGDOptions)
def sgd(params, options: SGDOptions):
    """torch.optim.SGD (momentum, Nesterov, weight decay)."""
    return torch.optim.SGD(_groups(params, options), lr=options.lr, momentum=options.momentum,
                           nesterov=options.nesterov, weight_decay=options.weight_decay)


@OPTIMIZERS.register("adamw", AdamOptions)
def adamw(params, options: AdamOptions):
    """torch.optim.AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(_groups(params, options), lr=options.lr, betas=options.betas, eps=options.eps,
                             weight_decay=options.weight_decay)


@OPTIMIZERS.register("adam", AdamOptions)
def adam(params, options: AdamOptions):
    """torch.optim.Adam (L2 weight decay)."""
    return torch.optim.Adam(_groups(params, options), lr=options.lr, betas=options.betas, eps=options.eps,
                            weight_decay=options.weight_decay)


class LRSchedule:
    """Warm-up + decay schedule, stepped by DeepSpeed once per applied optimizer step."""

    def __init__(self, optimizer, schedule, peak_lr: float, steps_per_epoch: int, epochs: float):
        self.optimizer = optimizer
        self.cfg = schedule
        self.peak = float(peak_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        total_epochs = schedule.epochs_for_schedule or epochs
        self.total_steps = max(1, int(round(total_epochs * steps_per_epoch)))
        self.warmup = (schedule.warmup_steps if schedule.warmup_steps is not None
                       else int(round(schedule.warmup_epochs * steps_per_epoch)))
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups] if optimizer else []
        for g, lr in zip(optimizer.param_groups if optimizer else [], self.base_lrs):
            g["initial_lr"] = lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        c, peak = self.cfg, self.peak
        if step < self.warmup:
            return c.min_lr + (peak - c.min_lr) * step / self.warmup
        t, T = step - self.warmup, max(1, self.total_steps - self.warmup)
        t = min(t, T)
        if c.name == "constant":
            return peak
        if c.name == "cosine":
            return c.min_lr + 0.5 * (peak - c.min_lr) * (1 + math.cos(math.pi * t / T))
        if c.name == "linear":
            return peak + (c.min_lr - peak) * t / T
        if c.name == "step":
            epoch = step / self.steps_per_epoch
            return peak * c.gamma ** sum(1 for d in c.decay_points if epoch >= d)
        raise ValueError(f"unknown schedule {c.name!r}")

    def _apply(self):
        if self.optimizer is None:  # schedule-only use (ds-ext schedule)
            return
        factor = self.lr_at(self.last_step) / self.peak
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor

    def step(self, *_, **__):
        self.last_step += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_lr(self):
        return self.get_last_lr()

    def state_dict(self):
        return {"last_step": self.last_step}

    def load_state_dict(self, state):
        self.last_step = int(state["last_step"])
        self._apply()
