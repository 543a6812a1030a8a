"""Synchronisation periods: how many local optimizer steps H run between two parameter averagings.

* ``constant``: H fixed.
* ``qsr``: the Quadratic Synchronization Rule -- Gu, Lyu, Arora, Zhang, Huang, "A Quadratic
  Synchronization Rule for Distributed Deep Learning", ICLR 2024, eq. (3):
  H = max(H_base, floor((alpha / eta)^power)) with power = 2, where eta is the learning rate of the
  first step of the new round. As the reference (hmgxr128/QSR ``localopt.py: adjust_h``) computes it:
  once before training for the first round and after each averaging for the next one, from the
  learning rate already set for the round's first step; ``init_h`` while that step is inside the LR
  warm-up (so with ``warmup_steps`` 0 and alpha > 0 the first round already follows the rule at the
  first step's learning rate, not ``init_h``); clamped to the remaining steps so the last round ends
  exactly at the last step; ``int()`` = floor.
* ``postlocal``: post-local SGD (Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches, Use Local
  SGD", ICLR 2020): gradients are averaged every step (data-parallel) until ``switch_step``, then local
  rounds of ``h`` steps.

Every period clamps H to [1, remaining steps] when the total is known. A deliberate deviation for
``constant`` (the reference clamps only in its QSR branch): with a constant H the last round is
shortened to end, with an averaging, on the last step, so the run ends on averaged parameters; the
reference runs its trailing ``total % H`` local steps without averaging them.

``ds-ext schedule --recipe R [--set k=v ...] [--world-size N] [--csv]`` (``ds_ext/trainer/cli.py``, which reads
the recipe) prints a recipe's whole schedule without training, from ``make_period`` and ``simulate``.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple


class Period:
    """``first_h(lr)`` before step 0 (``lr`` = learning rate of step 0; None when unknown);
    ``next_h(step, lr)`` right after an averaging that ended ``step`` optimizer steps (``lr`` = learning
    rate of step ``step``, the first of the new round); ``data_parallel(step)``: whether step ``step``
    averages gradients instead of stepping locally."""

    name = "period"

    def __init__(self, total_steps: Optional[int] = None):
        self.total_steps = total_steps

    def _clamp(self, h: int, step: int) -> int:
        if self.total_steps is not None:
            h = min(h, self.total_steps - step)
        return max(int(h), 1)

    def first_h(self, lr: Optional[float] = None) -> int:
        return self._clamp(self._first(lr), 0)

    def next_h(self, step: int, lr: float) -> int:
        return self._clamp(self._next(step, lr), step)

    def data_parallel(self, step: int) -> bool:
        return False

    def _first(self, lr: Optional[float]) -> int:
        raise NotImplementedError

    def _next(self, step: int, lr: float) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class Constant(Period):
    name = "constant"

    def __init__(self, h: int, total_steps: Optional[int] = None):
        super().__init__(total_steps)
        self.h = int(h)

    def _first(self, lr):
        return self.h

    def _next(self, step, lr):
        return self.h

    def describe(self):
        return f"constant H={self.h}"


class QSR(Period):
    """H = max(H_base, floor((alpha / lr)^power)); ``init_h`` during warm-up (QSR eq. 3 + reference).

    The first round is the rule at step 0 (``_next(0, lr)``, as the reference's ``adjust_h()`` before
    training): ``init_h`` when step 0 is in the warm-up or alpha is 0, else the rule at the first
    learning rate. Without a learning rate (``first_h()``) it falls back to ``init_h``."""

    name = "qsr"

    def __init__(self, alpha: float, h_base: int, power: float = 2.0, init_h: Optional[int] = None,
                 warmup_steps: int = 0, total_steps: Optional[int] = None):
        super().__init__(total_steps)
        self.alpha, self.h_base, self.power = float(alpha), int(h_base), float(power)
        self.init_h = int(init_h if init_h is not None else h_base)
        self.warmup_steps = int(warmup_steps)

    def rule(self, lr: float) -> int:
        if self.alpha == 0:
            return self.init_h
        if lr <= 0:
            return sys.maxsize  # lr 0: no reason to communicate; the clamp ends the round at the last step
        return max(int((self.alpha / lr) ** self.power), self.h_base)

    def _first(self, lr):
        return self.init_h if lr is None else self._next(0, lr)

    def _next(self, step, lr):
        if step < self.warmup_steps or self.alpha == 0:
            return self.init_h
        return self.rule(lr)

    def describe(self):
        return (f"qsr alpha={self.alpha:g} H_base={self.h_base} power={self.power:g} init_h={self.init_h} "
                f"(warm-up {self.warmup_steps} steps)")


class PostLocal(Period):
    """Data-parallel (gradient averaging) for steps < ``switch_step``, then rounds of ``h`` local steps."""

    name = "postlocal"

    def __init__(self, switch_step: int, h: int, total_steps: Optional[int] = None):
        super().__init__(total_steps)
        self.switch_step, self.h = int(switch_step), int(h)

    def data_parallel(self, step):
        return step < self.switch_step

    def _first(self, lr):
        return 1 if self.switch_step > 0 else self.h

    def _next(self, step, lr):
        return 1 if step < self.switch_step else self.h

    def describe(self):
        return f"post-local: data-parallel until step {self.switch_step}, then H={self.h}"


def make_period(options, warmup_steps: int = 0, total_steps: Optional[int] = None) -> Period:
    """From a synchronizer's options (fields ``period``, ``h``, ``alpha``, ``h_base``, ``power``,
    ``init_h``, ``switch_step``)."""
    kind = options.period
    if kind == "constant":
        return Constant(options.h, total_steps)
    if kind == "qsr":
        return QSR(options.alpha, options.h_base, options.power, options.init_h, warmup_steps, total_steps)
    if kind == "postlocal":
        return PostLocal(options.switch_step, options.h, total_steps)
    raise ValueError(f"unknown period {kind!r}; choose constant, qsr or postlocal")


def simulate(period: Period, lr_at: Callable[[int], float], total_steps: int) -> List[Tuple[int, int, bool]]:
    """Every round as (first step, H, data-parallel), exactly as the synchronizer walks them."""
    rounds, step, h = [], 0, period.first_h(lr_at(0))
    while step < total_steps:
        h = min(h, total_steps - step)
        rounds.append((step, h, period.data_parallel(step)))
        step += h
        if step < total_steps:
            h = period.next_h(step, lr_at(step))
    return rounds
