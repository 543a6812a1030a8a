"""D-GraB and CD-GraB: gradient-balanced data orders for distributed training.

Papers: Guo, Pham, Lu, Yuan, Ruan, De Sa, "Scale up with Order: Finding Good Data Permutations for
Distributed Training" (arXiv 2302.00845 v1, D-GraB) and its NeurIPS 2023 version "CD-GraB:
Coordinating Distributed Example Orders for Provably Accelerated Training". Reference code:
GarlGuo/D-GraB (``d_algo.py``: ``D_GraB_PairBalance`` at f8c4cae, ``CD_GraB`` at dc056f3).

PairBalance (``PairBalance`` below, no communication inside): every rank holds the same table
``orders[n, m]`` (worker j visits its local unit ``orders[j, t]`` at microbatch t of the epoch), an
empty ``next_orders[n, m]``, ONE running sum ``s`` shared by all workers and two pointers
``left = 0, right = m - 1``. For every pair of consecutive microbatches (2p, 2p+1) the gathered
differences ``v_j = g_j(2p) - g_j(2p+1)`` are balanced in the fixed worker order j = 0..n-1::

    if <s, v_j> <= 0:  next[j, left] = orders[j, 2p];   next[j, right] = orders[j, 2p+1];  s += v_j
    else:              next[j, right] = orders[j, 2p];  next[j, left]  = orders[j, 2p+1];  s -= v_j
    left += 1; right -= 1   (after the n workers)

At the epoch boundary ``orders = next_orders``, ``s = 0``. Every rank runs the same deterministic loop
on the same gathered data, so all ranks hold identical tables; a rank uses its own row.

Registered orders:

* ``dgrab`` (D-GraB v1): each rank keeps its microbatch gradient of the even position and, after the
  odd one, ``all_gather``s the pair difference (d floats per rank every 2 microbatches, on top of the
  reducer's gradient allreduce).
* ``cdgrab`` (CD-GraB): the ``cdgrab`` reducer ``all_gather``s every microbatch gradient INSTEAD of
  the gradient allreduce (the optimizer applies the mean of the gathered tensor) and hands the
  gathered ``[n, d]`` tensor to this order, which forms the pair differences itself: ordering costs no
  extra collective round. Both ``method.order`` and ``method.reducer`` must be ``cdgrab``.

Decisions on the reference code's quirks:

* Unit of ordering: v1 orders single examples (``--train_B 1``). Here the unit is a fixed group of
  ``train.micro_batch_size`` examples of the local shard (unit u = shard[u*B:(u+1)*B]), which is the
  v1 partition ``node_idx_map[n, m, B]``; set ``train.micro_batch_size=1`` for the per-example
  algorithm of the paper. The units are fixed for the whole run; only their order changes.
* Gradient accumulation: v1's ``batch > 0 and batch % grad_acc == 0`` makes the first optimizer step
  of every epoch use ``grad_acc + 1`` microbatches. NOT reproduced: DeepSpeed's fixed accumulation
  windows are kept (every step uses exactly ``grad_acc`` microbatches); the sorter is independent of
  where the optimizer steps fall.
* m even: the number of microbatches per epoch must be even (pairs). The trainer drops the last
  optimizer step of the epoch when steps x grad_acc is odd (only possible with odd grad_acc) and says
  so. ``PairBalance`` itself refuses an odd m.
* The remainder (option ``remainder``): the r = shard - m x B examples of the shard that do not fill
  the epoch's m units of B. ``drop`` (default, the reference's behaviour, v1: ``last_even_num``): they
  are never visited, in any epoch; the trainer's start-up line names the count. ``visit`` (an
  addition): remainder example k (k = 0..r-1, in shard order) joins unit ``floor(k m / r)`` for the
  whole run, so r units hold B + 1 examples instead of B (r > m: every unit holds B + floor(r/m) or
  B + ceil(r/m)): every example of the shard is visited exactly once per epoch, the number of units (so of
  microbatches and optimizer steps) and the pairing are unchanged, equal on every rank, and the
  assignment is a fixed function of the seeded shard (deterministic). The units stay fixed for the
  whole run, so the balancing still orders the same units every epoch. Cost: those microbatches are
  larger, and the trainer's per-microbatch mean loss gives each of their examples the weight
  B / (B + 1) of an example in a unit of B (B = 1: a half). Refused when a unit would more than double
  (only when ``train.steps_per_epoch`` caps the epoch far below the shard), and with a data set that
  brings its own loader (``loader_factory``, e.g. FFCV), which cannot serve variable microbatches.
* Epoch 0 uses the identity order of the (seeded, randomly drawn) shard, as v1 (its partition is a
  random shuffle); CD-GraB's ``randperm`` initial order is not used.
* Sign test: ``<s, v> <= 0`` (CD-GraB's form), equal to v1's ``||s+v|| <= ||s-v||`` in exact
  arithmetic; a tie goes to the "+" branch in both (``sign_by_norm`` / ``sign_by_inner``).
* The sorter sees the gradient DeepSpeed's ``backward`` produces for one microbatch, i.e. of
  ``loss / grad_acc`` (a positive constant factor: no decision changes), through ``Tensor`` hooks on
  the parameters (before accumulation into ``.grad``), not a second backward. v1's LSTM script clips
  the microbatch gradient before the sorter; here the sorter sees it unclipped.
* Deviation (option ``project_dim: k``, default 0 = off): balance a seeded CountSketch projection of
  the gradient to k dims (each coordinate i goes to bucket h(i) with sign s(i), the same on every
  rank; inner products are preserved in expectation). It cuts the gathered tensor from n x d to n x k
  floats and the sequential balancing loop from d to k per worker. Not in the paper; its effect on the
  herding bound and on training loss is measured by ``python -m benchmarks.herding --project-dim k``
  and ``python -m benchmarks.order``.
"""
from __future__ import annotations

import math
import time
from typing import List, Literal, Optional, Tuple

import torch
from pydantic import Field

from ..registry import ORDERS, Options
from .base import Order, seeded_generator

#: the meter's kind of D-GraB's pair-difference all_gather (``ds_ext.meter.PURPOSES``: "order balancing")
ORDER_KIND = "order_balance"


def sign_by_norm(s: torch.Tensor, v: torch.Tensor) -> bool:
    """v1's test: True ("+": even unit to the front, s += v) iff ||s + v|| <= ||s - v||."""
    return bool(torch.linalg.vector_norm(s + v) <= torch.linalg.vector_norm(s - v))


def sign_by_inner(s: torch.Tensor, v: torch.Tensor) -> bool:
    """CD-GraB's test, the one used: True iff <s, v> <= 0 (equal to ``sign_by_norm``, ties included)."""
    return bool(torch.dot(s, v) <= 0)


class PairBalance:
    """The replicated PairBalance state of all n workers (no communication; see the module doc).

    The sign decisions stay on the gradients' device (``signs[p, j]``: worker j's pair p went "+"):
    balancing a pair reads nothing on the host; the next table is resolved from the signs when it is
    needed (the epoch boundary, a checkpoint), one host read per epoch instead of n per pair."""

    def __init__(self, n: int, m: int):
        if m % 2:
            raise ValueError(f"PairBalance needs an even number of microbatches per epoch (pairs), got m={m}")
        if m < 2:
            raise ValueError(f"PairBalance needs at least 2 microbatches per epoch, got m={m}")
        self.n, self.m = n, m
        self.orders = torch.arange(m, dtype=torch.int64).repeat(n, 1)
        self.signs: Optional[torch.Tensor] = None  # [m/2, n] bool, rows < left are decided
        self.run_sum: Optional[torch.Tensor] = None
        self.left, self.right = 0, m - 1

    @property
    def complete(self) -> bool:
        return self.left == self.m // 2 and self.right + 1 == self.m // 2

    def step(self, diffs: torch.Tensor) -> None:
        """Balance one pair position for all workers; ``diffs[j]`` = g_j(even) - g_j(odd)."""
        if self.left >= self.m // 2:
            raise RuntimeError(f"PairBalance: more than m={self.m} microbatches in one epoch")
        if diffs.shape[0] != self.n:
            raise ValueError(f"expected {self.n} gathered rows, got {diffs.shape[0]}")
        if self.run_sum is None:
            self.run_sum = torch.zeros(diffs.shape[1], dtype=diffs.dtype, device=diffs.device)
        elif self.run_sum.device != diffs.device:  # restored from a checkpoint on CPU
            self.run_sum = self.run_sum.to(diffs.device)
        if self.signs is None or self.signs.device != diffs.device:
            old = self.signs
            self.signs = torch.zeros(self.m // 2, self.n, dtype=torch.bool, device=diffs.device)
            if old is not None:
                self.signs.copy_(old)
        s, row = self.run_sum, self.signs[self.left]
        for j in range(self.n):
            v = diffs[j]
            plus = torch.dot(s, v) <= 0  # CD-GraB's sign test, on the device
            row[j] = plus
            s.add_(torch.where(plus, v, -v))  # s += v ("+") or s -= v
        self.left += 1
        self.right -= 1

    @property
    def next_orders(self) -> torch.Tensor:
        """The table being built: ``next[j, p]`` / ``next[j, m-1-p]`` hold worker j's units of pair p,
        the even one in front when its sign was "+"; -1 where no pair has been balanced yet."""
        nxt = torch.full((self.n, self.m), -1, dtype=torch.int64)
        k = self.left
        if k and self.signs is not None:
            signs = self.signs[:k].cpu().T  # [n, k]: a host read (epoch boundary, checkpoint)
            even, odd = self.orders[:, 0:2 * k:2], self.orders[:, 1:2 * k:2]
            nxt[:, :k] = torch.where(signs, even, odd)
            nxt[:, self.m - k:] = torch.where(signs, odd, even).flip(1)
        return nxt

    def sort(self) -> None:
        """Epoch boundary: the balanced table becomes the order; reset sum and pointers."""
        if not self.complete:
            raise RuntimeError(f"PairBalance: epoch ended after {2 * self.left} of m={self.m} microbatches; "
                               "every microbatch of the epoch must be observed before the next order is taken")
        self.orders = self.next_orders
        self.signs, self.run_sum = None, None
        self.left, self.right = 0, self.m - 1

    def state_dict(self) -> dict:
        return {"n": self.n, "m": self.m, "orders": self.orders.clone(), "next_orders": self.next_orders,
                "run_sum": None if self.run_sum is None else self.run_sum.detach().cpu().clone(),
                "left": self.left, "right": self.right}

    def load_state_dict(self, st: dict, device=None) -> None:
        if (st["n"], st["m"]) != (self.n, self.m):
            raise ValueError(f"sorter state is for n={st['n']}, m={st['m']}; this run has n={self.n}, m={self.m}")
        self.orders = st["orders"].clone()
        self.left, self.right = int(st["left"]), int(st["right"])
        nxt, k = st["next_orders"], self.left
        self.signs = torch.zeros(self.m // 2, self.n, dtype=torch.bool)
        if k:  # the signs are what the table says: the even unit of pair p in front means "+"
            self.signs[:k] = (nxt[:, :k] == self.orders[:, 0:2 * k:2]).T
        rs = st["run_sum"]
        self.run_sum = None if rs is None else rs.clone().to(device if device is not None else rs.device)


class CountSketch:
    """Seeded CountSketch projection R^d -> R^k (same on every rank): y[h(i)] = sum_i s(i) x[i].

    Deterministic by construction: the coordinates are grouped by bucket once (a padded [k, L] gather
    table, L the largest bucket, padding pointing at coordinate 0 with sign 0), and each bucket is summed
    by one reduction over its row, in increasing coordinate order; no atomic scatter, so every rank (and
    every run) gets the same bits on a GPU too (a non-finite ``x[0]`` reaches the padded buckets too; the
    engine's guard zeroes a non-finite gradient before an order sees it). Memory: the table (``k x L`` int64 and fp32 signs, about
    12 bytes per coordinate) stays; a projection gathers at most ``chunk`` elements at a time (buckets in
    slices), so its temporary is bounded (64 MiB) however many rows and coordinates there are (issue 27 N8:
    one [rows, k, L] gather plus two [rows, d] copies per call, about 3 x rows x d x 4 bytes)."""

    #: elements gathered at once by a projection (fp32: 64 MiB)
    chunk = 1 << 24

    def __init__(self, d: int, k: int, seed: int, device=None):
        g = seeded_generator(seed, 0xC5, d, k)
        self.d, self.k = d, k
        bucket = torch.randint(0, k, (d,), generator=g)
        sign = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()
        order = torch.sort(bucket, stable=True).indices  # coordinates grouped by bucket, increasing within
        counts = torch.bincount(bucket, minlength=k)
        width = int(counts.max()) if d else 0
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(d) - starts[bucket[order]]  # position of each sorted coordinate in its row
        table = torch.zeros((k, max(width, 1)), dtype=torch.int64)  # padding: coordinate 0 ...
        signs = torch.zeros((k, max(width, 1)))  # ... with sign 0
        table[bucket[order], slot] = order
        signs[bucket[order], slot] = sign[order]
        self.table, self.signs = table.to(device), signs.to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project the last dimension of ``x`` ([d] or [r, d])."""
        x = x.float()
        rows = x[..., :1].numel()
        out = x.new_empty(x.shape[:-1] + (self.k,))
        per = max(1, self.chunk // max(1, rows * self.table.shape[1]))  # buckets per slice
        for b0 in range(0, self.k, per):
            b1 = min(self.k, b0 + per)
            part = x[..., self.table[b0:b1]]  # [..., buckets, L]
            part.mul_(self.signs[b0:b1])
            torch.sum(part, dim=-1, out=out[..., b0:b1])
        return out


class DGrabOptions(Options):
    project_dim: int = Field(0, ge=0, description="balance a seeded CountSketch projection of the gradient to "
                                                  "this many dims (0: the full gradient, as the paper)")
    remainder: Literal["drop", "visit"] = Field(
        "drop", description="the shard's examples that do not fill the epoch's units: drop (never visited, as the "
                            "reference) or visit (spread over the units, one more example in r of them; every "
                            "example once per epoch)")


def spread(r: int, m: int) -> List[List[int]]:
    """``remainder: visit``: which of the r remainder examples (0..r-1) join each of the m units: example k
    joins unit ``floor(k m / r)`` (r <= m: r distinct units, spread over the shard; r > m: every unit gets
    floor(r/m) or ceil(r/m))."""
    out: List[List[int]] = [[] for _ in range(m)]
    for k in range(r):
        out[k * m // r].append(k)
    return out


@ORDERS.register("dgrab", DGrabOptions)
class DGrab(Order):
    """D-GraB PairBalance: all_gather of pair differences every 2 microbatches, one shared running sum."""

    Options = DGrabOptions  # the defaults when built without the registry
    observes_gradients = True

    def __init__(self, num_examples, rank, world_size, seed, options=None):
        super().__init__(num_examples, rank, world_size, seed, options)
        self.sorter: Optional[PairBalance] = None
        self.epoch = 0
        self.seen = 0  # microbatches observed in the current epoch
        self.cache: Optional[torch.Tensor] = None
        self.comm, self.sketch = None, None
        self.dropped_examples = 0  # remainder examples never visited (remainder: drop)
        self.remainder_examples = 0  # r: the shard's examples that do not fill the m units
        self.extras: Optional[List[List[int]]] = None  # remainder: visit, the examples each unit gets
        # the balancing cost, for the logs (this process's, not checkpointed): host seconds in the pair step
        # (the exchange and PairBalance's sign decisions) and the bytes this rank sent for it
        self.balance_seconds, self.balance_bytes = 0.0, 0

    # ---- planning (the trainer calls this before building the engine) -------------------------
    def plan(self, micro_batch_size: int, grad_acc: int, steps_per_epoch: int) -> Tuple[int, Optional[str]]:
        notes = []
        if (steps_per_epoch * grad_acc) % 2:
            notes.append(f"{steps_per_epoch} steps x {grad_acc} microbatches = {steps_per_epoch * grad_acc} "
                         "microbatches per epoch is odd and PairBalance pairs consecutive microbatches: the last "
                         f"step of every epoch is dropped ({steps_per_epoch - 1} steps per epoch)")
            steps_per_epoch -= 1
        m = steps_per_epoch * grad_acc
        if m < 2:
            raise ValueError(f"{self.name}: needs at least 2 microbatches per epoch per rank, got {m}")
        B, r = micro_batch_size, self.shard_size - m * micro_batch_size
        visit = self.options.remainder == "visit"
        if visit and r and -(-r // m) > B:
            raise ValueError(f"{self.name}: remainder: visit would put {r} remainder examples into {m} units of {B} "
                             f"(more than doubling them); train.steps_per_epoch caps the epoch far below the shard of "
                             f"{self.shard_size}: use remainder: drop")
        self.micro = B
        self.sorter = PairBalance(self.world, m)
        self.remainder_examples = r
        self.dropped_examples = 0 if visit else r
        self.extras = None
        if visit and r:
            base = m * B
            self.extras = [[self.shard[base + k] for k in ks] for ks in spread(r, m)]
            notes.append(f"m={m} units of {B} example(s) per rank per epoch; the {r} remainder examples of each "
                         f"local shard of {self.shard_size} join {sum(1 for e in self.extras if e)} of the units "
                         f"(remainder: visit)")
        else:
            notes.append(f"m={m} units of {B} example(s) per rank per epoch; {r} of the {self.shard_size} "
                         f"examples of each local shard are not used")
        return steps_per_epoch, f"order {self.name}: " + "; ".join(notes)

    def remainder_note(self) -> Optional[str]:
        """What happens to the shard's remainder, for the trainer's start-up line (None: no remainder)."""
        self._ensure_plan()
        r = self.remainder_examples
        if not r:
            return None
        if self.extras is None:
            return f"{self.name} drops {r} examples per rank per epoch (remainder: drop)"
        k = sum(1 for e in self.extras if e)
        return f"{self.name} visits its {r} remainder examples per rank in {k} enlarged units (remainder: visit)"

    @property
    def variable_units(self) -> bool:
        """True when the units differ in size (``remainder: visit`` with a remainder): the trainer then
        takes the epoch's microbatches from ``epoch_batches``."""
        self._ensure_plan()
        return self.extras is not None

    def _ensure_plan(self) -> None:
        if self.sorter is None:  # used without the trainer: per-example units, remainder dropped
            m = self.shard_size - self.shard_size % 2
            self.plan(1, 1, m)

    @property
    def name(self) -> str:
        return "dgrab"

    def bind(self, comm, numel: int, device=None) -> None:
        """Called by ``attach`` (``Order.bind``): the communicator, the gradient's size and device."""
        self.comm = comm
        if self.options.project_dim:
            self.sketch = CountSketch(numel, self.options.project_dim, self.seed,
                                      device if device is not None else comm.device)

    @classmethod
    def collectives(cls, shapes, world: int, options: DGrabOptions, grad_acc: int = 1, **_) -> list:
        """One all_gather of a pair difference (fp32, the gradient's d floats or ``project_dim``) every two
        microbatches: ``grad_acc / 2`` per optimizer step, metered as ``order_balance``."""
        from ..comm import Collective

        d = options.project_dim or sum(math.prod(s) for s in shapes)
        return [Collective("all_gather", 4 * d, world, calls=grad_acc / 2)]

    # ---- the order -----------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> List[int]:
        return [i for unit in self.epoch_batches(epoch) for i in unit]

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The epoch's units in visiting order, one list of example indices per microbatch (B examples,
        B + 1 or more for units holding remainder examples with ``remainder: visit``)."""
        self._ensure_plan()
        if epoch == self.epoch + 1:
            self.sorter.sort()
            self.epoch, self.seen, self.cache = epoch, 0, None
        elif epoch != self.epoch:
            raise ValueError(f"{self.name}: asked for epoch {epoch} while at epoch {self.epoch}; a gradient-driven "
                             "order can only move to the next epoch after seeing all of the current one")
        B = self.micro
        row = self.sorter.orders[self.rank].tolist()
        if self.extras is None:
            return [self.shard[u * B:(u + 1) * B] for u in row]
        return [self.shard[u * B:(u + 1) * B] + self.extras[u] for u in row]

    def local_order(self) -> List[int]:
        """This rank's current order of local units (row ``rank`` of the table)."""
        self._ensure_plan()
        return self.sorter.orders[self.rank].tolist()

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        return self.sketch(g) if self.sketch is not None else g

    def observe_microbatch(self, flat_grad: torch.Tensor) -> None:
        """One microbatch gradient of this rank (flat, before accumulation)."""
        self._ensure_plan()
        g = self._project(flat_grad)
        if self.seen % 2 == 0:
            self.cache = g.detach().clone()
        else:
            t = time.perf_counter()
            diff = self.cache.to(g.device).sub_(g)
            self.balance_bytes += diff.numel() * diff.element_size()
            self.sorter.step(self.comm.all_gather(diff, ORDER_KIND))
            self.balance_seconds += time.perf_counter() - t
            self.cache = None
        self.seen += 1

    def stats(self) -> dict:
        return {"balance_seconds": self.balance_seconds, "balance_bytes": self.balance_bytes,
                "dropped_examples": self.dropped_examples}

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._ensure_plan()
        st = {"epoch": self.epoch, "seen": self.seen, "micro": self.micro, "sorter": self.sorter.state_dict(),
              "cache": None if self.cache is None else self.cache.detach().cpu().clone()}
        if self.extras is not None:  # absent with remainder: drop (the state of every earlier checkpoint)
            st["remainder"] = "visit"
        return st

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._ensure_plan()
        if int(state["micro"]) != self.micro:
            raise ValueError(f"{self.name}: checkpoint orders units of {state['micro']} examples, this run {self.micro}")
        theirs, mine = state.get("remainder", "drop"), ("visit" if self.extras is not None else "drop")
        if theirs != mine:
            raise ValueError(f"{self.name}: checkpoint's units were built with remainder: {theirs}, this run's with "
                             f"remainder: {mine}")
        self.sorter.load_state_dict(state["sorter"])  # tensors move to the gradients' device on first use
        self.epoch, self.seen = int(state["epoch"]), int(state["seen"])
        self.cache = None if state["cache"] is None else state["cache"].clone()



@ORDERS.register("cdgrab", DGrabOptions)
class CDGrab(DGrab):
    """CD-GraB: PairBalance on the gathered microbatch gradients that replace the gradient allreduce."""

    @property
    def name(self) -> str:
        return "cdgrab"

    def observe_microbatch(self, flat_grad):
        raise RuntimeError("order 'cdgrab' is fed by the 'cdgrab' reducer (set method.reducer={name: cdgrab})")

    @classmethod
    def collectives(cls, shapes, world: int, options: DGrabOptions, grad_acc: int = 1, **_) -> list:
        """None of its own: the ``cdgrab`` reducer's gather (counted there) feeds it."""
        return []

    def observe_gathered(self, gathered: torch.Tensor) -> None:
        """The [n, d] microbatch gradients of all ranks (identical on every rank)."""
        self._ensure_plan()
        g = self._project(gathered)
        if self.seen % 2 == 0:
            self.cache = g.detach().clone()
        else:
            t = time.perf_counter()
            self.sorter.step(self.cache.to(g.device).sub_(g))
            self.balance_seconds += time.perf_counter() - t  # no bytes of its own: the reducer's gather feeds it
            self.cache = None
        self.seen += 1

    @classmethod
    def check(cls, view) -> list:
        names = view.names
        problems = []
        if names["reducer"] != "cdgrab":
            problems.append(("method.order", f"order 'cdgrab' is also the gradient reducer (its all_gather of microbatch "
                                             f"gradients replaces the allreduce); it cannot be combined with reducer "
                                             f"{names['reducer']!r}: set method.reducer={{name: cdgrab}}"))
        if names["sync"] != "none":
            problems.append(("method.order", f"order 'cdgrab' averages gradients every step; it cannot be combined with "
                                             f"sync {names['sync']!r} (use method.sync={{name: none}}, or order dgrab)"))
        return problems
