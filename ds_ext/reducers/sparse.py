"""Gradient sparsification with error feedback: ``topk`` and ``exdyna``.

Both reducers flatten every trainable parameter's gradient into one fp32 vector ``g`` of length N
(all tensors, 1-D ones included, in registration order; a missing gradient counts as zeros), add
the error-feedback memory ``e`` (``g = grad + e``), select coordinates, exchange them, write the
averaged sparse gradient back into ``p.grad`` (cast to the parameter's dtype: fp32, fp16 or bf16),
and keep what was not applied in ``e``:

    e_r <- g_r with the coordinates counted as sent set to 0
    sum_t applied_t + mean_r e_r  ==  sum_t mean_r grad_r,t      (error-feedback conservation)

The selection needs the whole vector, so every collective waits for ``finish()``; what can start earlier
starts in the gradients' ready hooks (``flat_overlap``): each gradient's addition into ``e`` and the zeroing of
the dense output (both methods), and for ExDyna the step's partition and threshold (known from the last step),
the threshold count over this rank's partition once every gradient in it is in (kept on the device: the selection
it sizes waits for the counts exchange, the step's one host read), and the non-finite check of the accumulated
part of ``g`` in chunks. All of it is the same arithmetic on the same data as after
backward: results are bit-identical to accumulating in ``finish()`` (tests/dist/test_overlap.py). Not started:
topk's selection (the k-th magnitude is global; a per-block top-k merged later picks the same set only without
ties at the k-th value, and costs more in total), ExDyna's counts exchange (the step's control exchange, which
carries the step hooks' vectors posted when ``engine.step()`` runs), and everything after it.
Memory per rank: two persistent N-element fp32 vectors (the residual, which doubles as the
send buffer, and the dense output; a send buffer replaces the residual without error feedback).
The inner loops go through ``ds_ext.ops`` (``threshold_count``, ``threshold_select``, ``topk_select``,
``scatter_add_``, ``zero_at_``, ``pack_values``): compiled CPU / CUDA kernels (``ds_ext/csrc``) when built,
torch code running the same algorithm otherwise.

``topk``
    Top-k sparsification with memory: Aji & Heafield, "Sparse Communication for Distributed Gradient
    Descent", EMNLP 2017; Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    Algorithm 1 (mem-SGD). Each rank selects its k = int(density * N) largest ``|g_r|``,
    all_gathers (index, value) pairs, and the applied gradient is ``(1/n) sum_r scatter(I_r, v_r)``;
    ``e_r`` keeps everything rank r did not send. The union of the n index sets can hold up to n*k
    coordinates ("gradient build-up", the problem ExDyna removes); its size is reported.
    ``exchange: union`` reproduces the seed's ``TopKReducer`` instead: all_gather the indices only,
    all_reduce every rank's ``g_r`` at the union U, apply ``mean_r g_r[U]`` and zero ``e_r`` at U.
    ``value_dtype: fp16|bf16`` (all_gather exchange only; an addition, not in the papers or the seed)
    sends the values rounded to that dtype (``ops.pack_values``: gather and conversion in one pass)
    and leaves the rounding error ``g - round(g)`` at the sent coordinates in ``e_r`` instead of 0, so
    the error-feedback conservation below still holds.

``exdyna``
    Yoon & Oh, "Preserving Near-Optimal Gradient Sparsification Cost for Scalable Distributed Deep
    Learning", CCGrid 2024 (arXiv 2402.13781): the four components of the paper -- block-based
    gradient vector partitioning, dynamic partition allocation, partition-wise exclusive gradient
    selection, online threshold scaling -- with the semantics of the seed's code
    (``kljp/exdyna@3295c70``, ``cnn-lstm/gradient_reducers.py: ExDynaReducer``), summarised in the
    four steps below. (Equation numbers are not cited: the paper's full text was not
    available; the behaviour below is the reference code's.)

    1. Partitioning (once): block size ``sz = a - a % 32`` with ``a = N // 1024``; 1024 blocks;
       the ``N - 1024 sz`` remainder elements are appended to the last partition; partition i gets
       ``1024 // n`` blocks (+1 for i < 1024 % n).
    2. Allocation (every step after the first): last step's per-rank counts are mapped back to the
       partitions those ranks held (``tk[(t-1+i) % n] = ks[i]``); for each adjacent pair (i, i+1),
       left to right, with ``d = tk / (k_prev // n)``: ``d_i > 1.05 and d_i+1 < 0.95238`` moves one
       block from i to i+1, the mirror case moves one block from i+1 to i, unless the donor would
       fall below ``min_blk = 1024 / (4n)``; ``tk`` is adjusted by ``int(sz * k_prev / N)`` after a
       move so the next pair sees it.
    3. Selection: rank r scans partition ``p = (t + r) % n`` (a rotation: exclusive across ranks),
       selects ``|g| >= threshold`` there in one pass; an empty selection sends the single element
       ``st + t % (en - st)``.
    4. Threshold: ``1 / (2 sqrt(k))`` at t = 0, then multiplied by 1.005 if ``k_prev / k > 1.1``,
       by 0.995 if ``k_prev / k <= 0.909``, and otherwise by 1.00125 (``threshold_rule: faithful``)
       or 1 (``threshold_rule: hold``).
    Communication, the seed's three collectives: all_gather of the per-rank counts (int64; the count
    is computed on the device first, ``ops.threshold_count``, and this exchange is the step's one host
    read, so the selection is then sized without another synchronisation),
    all_gather of the indices padded to the largest count (int64), all_reduce (sum) of every rank's
    ``g_r`` at all gathered indices (fp32). The applied gradient is ``sum_r g_r[I] / n`` on I, and
    ``e_r`` is zeroed at every globally selected coordinate. Logged load imbalance:
    ``max_r k_r * n / sum_r k_r - 1``.

Deliberate deviations from the reference code, named:

* ``threshold_rule`` (exdyna): ``faithful`` (default) reproduces the reference, whose threshold
  keeps growing by 0.125 % per step while the achieved count is on target (within (0.909, 1.1] of
  k), so the achieved density saw-tooths down to the 0.909 edge; ``hold`` keeps the threshold in
  that band, so the density settles inside it. The reference's dead ``else: 0.9987`` branch
  (unreachable: ``k_prev >= 1``) is not reproduced.
* Small vectors (exdyna): when ``N // 1024 < 32`` the reference's block size is 0 and its fallback
  divides by zero. Here the block size becomes ``block_align`` (32) and the number of blocks
  ``N // 32`` (or blocks of 1 element when ``N < 32 n``); layouts with ``N >= 32 * 1024`` are the
  reference's, bit for bit. ``num_blocks`` and ``block_align`` are options (defaults 1024, 32).
* ``k = max(1, int(density * N))`` (the reference takes the square root / top-k of 0 otherwise).
* ``initial_threshold`` (exdyna, default: the seed's ``1/(2 sqrt(k))``) can set the first
  threshold; ``0`` selects every coordinate, i.e. exact averaging.
* ``topk``'s all_gather exchange adds the n gathered (index, value) sets rank by rank, in rank order
  (one scatter per rank, whose indices are unique): the result does not depend on the order in which
  a GPU's atomic additions land, so every rank holds the same bits (the seed adds them in one call).
  Its union size (a sort) is computed only when ``stats()`` is read (logging steps).
* Padding of the index all_gather is zeros (the reference pads with uninitialised memory); it is
  never read.
* One rank (no process group or world size 1): the same selection, no collectives (the reference
  crashes there).
* ``topk``: by default the (index, value) all_gather of the issue (the textbook exchange);
  ``exchange: union`` is the seed's ``TopKReducer`` (see above).
* Bytes reported are every tensor handed to a collective, the count all_gather included (the
  reference reports only indices + values).
* Recipes with fp16 dynamic loss scaling are refused, with the policy and message every error-feedback
  reducer shares (``base.fp16_loss_scaling_problem``, reached through ``check``): the residual would keep
  each step's loss scale, so a scale change corrupts it. A static ``fp16.loss_scale`` is accepted
  (selection and values scale with it; exdyna's absolute first threshold is the one exception, see
  there). The seed trains in fp32; bf16 and fp16 gradients are otherwise handled (fp32 residual and
  arithmetic, result cast back).
* ``error_feedback`` also accepts PyTorch PowerSGD's spelling ``use_error_feedback`` (one spelling per
  concept across methods, the other names as aliases: ``registry.Options``).
"""
from __future__ import annotations

import bisect
import math
from typing import List, Literal, Optional, Sequence, Tuple

import torch
from pydantic import Field, model_validator

from .. import ops
from ..registry import REDUCERS
from .base import GradientOptions, error_feedback_field
from .flat_overlap import OverlappedFlatReducer, extremes, nonfinite_of

# constants of the reference code, written as it writes them
ALLOC_HI, ALLOC_LO = 1.05, 0.95238          # partition load bounds (1.05 and ~1/1.05)
THRESH_HI, THRESH_LO = 1.1, 0.909           # k_prev / k bounds (1.1 and ~1/1.1)
SF_UP, SF_ON_TARGET, SF_DOWN = 1.005, 1.00125, 0.995


class _SparseBase(OverlappedFlatReducer):
    """A flat reducer with a target count ``k = density * N`` and the last selection (diagnostics)."""

    keeps_scaled_state = True  # the residual e: base.fp16_loss_scaling_problem applies

    def __init__(self, named_params, options, **kw):
        super().__init__(named_params, options, **kw)
        self.k = max(1, int(options.density * self.numel))
        self.last: dict = {}  # the last step's selection, for diagnostics and tests


# ================================================================================================ topk
class TopKOptions(GradientOptions):
    density: float = Field(0.001, gt=0, le=1,
                           description="fraction of the gradient each rank sends per step, k = density * N "
                                       "(the seed's experiments use 0.001)")
    exchange: Literal["allgather", "union"] = Field(
        "allgather", description="'allgather': all_gather (index, value) of every rank's top-k; "
                                 "'union': the seed's TopKReducer (all_gather indices, all_reduce values at the union)")
    error_feedback: bool = error_feedback_field("keep unsent coordinates in a residual added to the next "
                                                "gradient (the seed's optimizer_memory)")
    value_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype of the values on the wire (exchange 'allgather' only): fp16/bf16 halve the value "
                            "bytes; the rounding error stays in the residual (error feedback)")

    @model_validator(mode="after")
    def _value_dtype_needs_allgather(self):
        if self.value_dtype != "fp32" and self.exchange != "allgather":
            raise ValueError(f"value_dtype {self.value_dtype!r} needs exchange 'allgather' (the 'union' exchange "
                             "all_reduces the values, which would sum them in that dtype)")
        return self


_VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@REDUCERS.register("topk", TopKOptions)
class TopKReducer(_SparseBase):
    """Top-k sparsification with error feedback; reports the union size of the n top-k sets.

    Non-finite guard (``base.Reducer``): ``torch.topk`` ranks NaN above every number and ``|inf|`` is the
    largest magnitude, so a NaN or inf anywhere in ``g = grad + e`` is among the k values a rank sends; the
    gathered values (all-reduced at the union with ``exchange: union``), identical on every rank, show it."""

    nonfinite_view = "reduced"

    def finish(self) -> None:
        g = self._send_buffer()
        idx, vals = ops.topk_select(g, self.k)
        n = self.world_size
        dense = self._output()
        ef = g if self.error is not None else None
        gathered = None
        if not self.distributed:
            self._watch(vals)
            ops.scatter_add_(dense, idx, vals, zero_in=ef)  # EF zeroing of what was sent, same pass
        elif self.options.exchange == "allgather":
            vdt = _VALUE_DTYPES[self.options.value_dtype]
            sent = vals if vdt == torch.float32 else ops.pack_values(g, vdt, idx)  # gather + convert, one pass
            gathered = self.comm.all_gather(idx, "topk_indices")  # [n, k]
            all_vals = self.comm.all_gather(sent, "topk_values")
            self._watch(all_vals)  # the non-finite guard's view: every rank's sent values (class docstring)
            # rank by rank, in rank order: indices are unique within a rank, so no two additions of one
            # call hit the same coordinate and the sums do not depend on the order of atomic additions
            for r in range(n):
                ops.scatter_add_(dense, gathered[r], all_vals[r])
            dense.div_(n)
            if ef is not None:
                if vdt == torch.float32:
                    ops.zero_at_(g, idx)  # only this rank's own sent coordinates
                else:  # keep what rounding to the wire dtype lost
                    g[idx] = vals - sent.float()
        else:
            gathered = self.comm.all_gather(idx, "topk_indices")
            union = torch.unique(gathered)  # sorted, unique (its size is data-dependent: a device sync on a GPU)
            summed = self.comm.all_reduce(g[union], "topk_values").div_(n)
            self._watch(summed)
            ops.scatter_add_(dense, union, summed, zero_in=ef)
        self._write_back(dense)
        self.iteration += 1
        self.last = {"indices": idx, "gathered": gathered}
        self._end_step()

    @classmethod
    def collectives(cls, shapes, world: int, options: TopKOptions, **_) -> list:
        """All_gather of k int64 indices and k values (``allgather``); the ``union`` exchange all-reduces
        the values at the union of the n index sets, counted here at its largest, min(n k, N)."""
        from ..comm import Collective
        from .buckets import numel_of

        numel = sum(numel_of(s) for s in shapes)
        k = max(1, int(options.density * numel))
        if options.exchange == "union":
            return [Collective("all_gather", 8 * k, world), Collective("all_reduce", 4 * min(world * k, numel), world)]
        vbytes = torch.empty((), dtype=_VALUE_DTYPES[options.value_dtype]).element_size()
        return [Collective("all_gather", 8 * k, world), Collective("all_gather", vbytes * k, world)]

    def describe(self, total_steps=None) -> str:
        """Attach's line: k of N elements per rank, how they travel."""
        o = self.options
        how = ("(index, value) pairs all_gathered" if o.exchange == "allgather" else
               "indices all_gathered, values all_reduced at their union")
        vals = f", values in {o.value_dtype}" if o.value_dtype != "fp32" else ""
        return (f"{self.registered_name} density {o.density:g}: {self.k:,} of {self.numel:,} gradient elements per "
                f"rank, {how}{vals}, error feedback {'on' if o.error_feedback else 'off'}, {self.traffic()}")

    def union(self) -> torch.Tensor:
        """The union of the last step's n top-k index sets (computed on demand: it needs a sort)."""
        g = self.last.get("gathered")
        return self.last["indices"] if g is None else torch.unique(g)

    def stats(self) -> dict:
        """Read on logging steps only (the union size needs a sort and a host read)."""
        if not self.last:
            return {}
        u = self.union().numel()
        return {"density": u / self.numel, "target_density": self.options.density, "union_size": u, "k": self.k,
                "buildup": u / self.k}

    def state_dict(self) -> dict:
        return self._base_state()

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)


# ============================================================================================== exdyna
def block_layout(numel: int, world: int, num_blocks: int = 1024, align: int = 32) -> Tuple[int, int, int]:
    """``(number of blocks, block size, remainder)`` with ``blocks * size + remainder == numel``.

    The reference's rule (block size ``a - a % align``, ``a = numel // num_blocks``) whenever it gives
    a non-empty block; for smaller vectors blocks of ``align`` elements (1 when ``numel < align *
    world``), at most ``num_blocks`` of them (a documented deviation: the reference breaks there)."""
    if numel < world:
        raise ValueError(f"exdyna: the gradient has {numel} elements, fewer than the {world} ranks")
    if num_blocks < world:
        raise ValueError(f"exdyna: num_blocks={num_blocks} is smaller than the world size {world}")
    a = numel // num_blocks
    size = a - a % align
    if size > 0:
        return num_blocks, size, numel - size * num_blocks
    size = align if numel >= align * world else 1
    blocks = min(num_blocks, numel // size)
    return blocks, size, numel - size * blocks


def initial_partitions(num_blocks: int, world: int) -> Tuple[List[int], List[int]]:
    """``(blocks per partition, first block of each partition)``: equal split, the first
    ``num_blocks % world`` partitions one block larger."""
    q, r = divmod(num_blocks, world)
    part = [q + 1 if i < r else q for i in range(world)]
    pos = [0] * world
    for i in range(1, world):
        pos[i] = pos[i - 1] + part[i - 1]
    return part, pos


def partition_loads(ks: Sequence[int], iteration: int) -> List[int]:
    """Per-partition counts of step ``iteration`` from its per-rank counts (rank i held partition
    ``(iteration + i) % n``)."""
    n = len(ks)
    tk = [0] * n
    for i, k in enumerate(ks):
        tk[(iteration % n + i) % n] = int(k)
    return tk


def reallocate(part: Sequence[int], pos: Sequence[int], loads: Sequence[int], k_prev: int, numel: int,
               block_size: int, min_blocks: float) -> Tuple[List[int], List[int]]:
    """Dynamic partition allocation: one pass over adjacent pairs, left to right, moving at most one
    block across each boundary (step 2 of the module docstring). Returns new ``(part, pos)``."""
    part, pos, tk = list(part), list(pos), [int(x) for x in loads]
    n = len(part)
    k_acc = int(k_prev) // n
    if k_acc == 0:  # cannot happen when every rank sends >= 1 element (k_prev >= n); no division by 0
        return part, pos
    k_move = int(block_size * (k_prev / numel))
    for i in range(n - 1):
        d1, d2 = tk[i] / k_acc, tk[i + 1] / k_acc
        if d1 > ALLOC_HI and d2 < ALLOC_LO:
            if part[i] - 1 < min_blocks:
                continue
            part[i] -= 1
            part[i + 1] += 1
            pos[i + 1] -= 1
            tk[i] -= k_move
            tk[i + 1] += k_move
        if d1 < ALLOC_LO and d2 > ALLOC_HI:
            if part[i + 1] - 1 < min_blocks:
                continue
            part[i] += 1
            part[i + 1] -= 1
            pos[i + 1] += 1
            tk[i] += k_move
            tk[i + 1] -= k_move
    return part, pos


def partition_range(p: int, part: Sequence[int], pos: Sequence[int], block_size: int, remainder: int
                    ) -> Tuple[int, int]:
    """``[start, end)`` of partition ``p``; the last partition also holds the remainder elements."""
    n = len(part)
    start = pos[p] * block_size
    end = (pos[p] + part[p]) * block_size + (remainder if p == n - 1 else 0)
    return start, end


def threshold_factor(ratio: float, rule: str = "faithful") -> float:
    """Online threshold scaling factor from ``ratio = k_prev / k`` (achieved over target count)."""
    if ratio > THRESH_HI:
        return SF_UP
    if ratio > THRESH_LO:
        return SF_ON_TARGET if rule == "faithful" else 1.0
    return SF_DOWN


class ExDynaOptions(GradientOptions):
    density: float = Field(0.001, gt=0, le=1,
                           description="target fraction of the gradient selected per step over all ranks, "
                                       "k = density * N (the seed's experiments use 0.001)")
    threshold_rule: Literal["faithful", "hold"] = Field(
        "faithful", description="'faithful': the reference (x1.00125 per step while on target, so the threshold "
                                "creeps up); 'hold': keep the threshold while k_prev/k is in (0.909, 1.1]")
    initial_threshold: Optional[float] = Field(
        None, ge=0, description="first threshold; None = the seed's 1/(2 sqrt(k)); 0 selects everything")
    num_blocks: int = Field(1024, ge=1, description="blocks the gradient vector is cut into (seed: 1024)")
    block_align: int = Field(32, ge=1, description="block size is a multiple of this (seed: 32)")
    error_feedback: bool = error_feedback_field("keep unsent coordinates in a residual added to the next "
                                                "gradient (the seed's optimizer_memory)")


@REDUCERS.register("exdyna", ExDynaOptions)
class ExDynaReducer(_SparseBase):
    """ExDyna (Yoon & Oh, CCGrid 2024): block partitions, dynamic allocation, exclusive
    partition-wise threshold selection, online threshold scaling.

    Non-finite guard (``base.Reducer``): a NaN never passes ``|g| >= threshold`` and a rank scans only its
    own partition, so what is sent need not show it; each rank checks its whole ``g = grad + e`` (one fused
    reduction) and the flag rides on the counts exchange, the step's one host read (``nonfinite_ranks``)."""

    nonfinite_view = "exchange"

    def __init__(self, named_params, options: ExDynaOptions, **kw):
        super().__init__(named_params, options, **kw)
        n = self.world_size
        self.num_blocks, self.block_size, self.remainder = block_layout(
            self.numel, n, options.num_blocks, options.block_align)
        self.min_blocks = self.num_blocks / (4 * n)
        self.part, self.pos = initial_partitions(self.num_blocks, n)
        self.threshold = 0.0
        self.k_prev = 1
        self.ks_prev: List[int] = []
        self._check_nonfinite, self._bad_ranks = False, []

    def watch_nonfinite(self) -> None:
        self._check_nonfinite = True

    def describe(self, total_steps=None) -> str:
        """Attach's line: the target k over all ranks, the partitions, the traffic."""
        o = self.options
        return (f"{self.registered_name} density {o.density:g}: ~{self.k:,} of {self.numel:,} gradient elements "
                f"selected per step over all ranks by a threshold in each rank's partition ({self.num_blocks} blocks), "
                f"error feedback {'on' if o.error_feedback else 'off'}, {self.traffic()}")

    def nonfinite_ranks(self) -> Optional[List[int]]:
        bad, self._bad_ranks = self._bad_ranks, []
        return bad if self._check_nonfinite else None

    @classmethod
    def collectives(cls, shapes, world: int, options: ExDynaOptions, imbalance: float = 0.0, **_) -> list:
        """The counts (8 B), the indices padded to the largest count (k/n per rank, times 1 + ``imbalance``),
        the values at the union (k fp32)."""
        from ..comm import Collective
        from .buckets import numel_of

        k = max(1, int(options.density * sum(numel_of(s) for s in shapes)))
        per_rank = math.ceil(k / world * (1.0 + imbalance))
        return [Collective("all_gather", 8, world), Collective("all_gather", 8 * per_rank, world),
                Collective("all_reduce", 4 * k, world)]

    @classmethod
    def check(cls, view) -> list:
        """The flat reducers' rules, and (world size known) every rank owns at least one block."""
        problems = super().check(view)
        o = view.options.get("reducer")
        if view.world is not None and o is not None and o.num_blocks < view.world:
            problems.append(("method.reducer.num_blocks", f"{o.num_blocks} is smaller than the world size {view.world}; "
                                                          f"every rank needs at least one block (allowed: >= {view.world})"))
        return problems

    def ranges(self) -> List[Tuple[int, int]]:
        """``[start, end)`` of every partition under the current allocation."""
        return [partition_range(p, self.part, self.pos, self.block_size, self.remainder)
                for p in range(self.world_size)]

    # -- started during backward (module docstring) --------------------------------------------------------
    def _begin_step(self) -> None:
        """This step's partition and threshold: known before any gradient (from the last step's counts)."""
        super()._begin_step()
        t, n, o = self.iteration, self.world_size, self.options
        if t > 0:
            self.part, self.pos = reallocate(self.part, self.pos, partition_loads(self.ks_prev, t - 1),
                                             self.k_prev, self.numel, self.block_size, self.min_blocks)
        p = (t % n + self.rank) % n
        st, en = partition_range(p, self.part, self.pos, self.block_size, self.remainder)
        if t == 0:
            self.threshold = (1.0 / (2.0 * math.sqrt(self.k)) if o.initial_threshold is None
                              else float(o.initial_threshold))
        else:
            self.threshold *= threshold_factor(self.k_prev / self.k, o.threshold_rule)
        first = bisect.bisect_right(self.starts, st) - 1  # the gradients that overlap [st, en)
        last = bisect.bisect_left(self.starts, en) - 1
        self._plan = (p, st, en, first, last)
        self._waiting = sum(1 for i in range(first, last + 1) if not self._added[i])
        self._count: Optional[torch.Tensor] = None  # this rank's count over its partition, on the device
        self._exts: List[torch.Tensor] = []
        self._checked = self.numel  # g[_checked:] has its non-finite extremes in _exts

    def _accumulated(self, i: int) -> None:
        _, _, _, first, last = self._plan
        if first <= i <= last:
            self._waiting -= 1
            if not self._waiting:
                self._count_partition()
        if self._check_nonfinite and self._checked - self.suffix_start >= max(1, self.numel // 8):
            self._exts.append(extremes(self.error[self.suffix_start:self._checked] if self.error is not None
                                       else self._send[self.suffix_start:self._checked]))
            self._checked = self.suffix_start

    def _count_partition(self) -> None:
        """The threshold count over this rank's partition, kept on the device (no host read: the selection it
        sizes waits for the counts exchange)."""
        g = self.error if self.error is not None else self._send
        _, st, en, _, _ = self._plan
        self._count = ops.threshold_count(g, self.threshold, st, en)

    def finish(self) -> None:
        t, n, o = self.iteration, self.world_size, self.options
        g = self._send_buffer()  # every gradient in (the plan made at the step's first hook, or now)
        p, st, en, _, _ = self._plan
        if self._count is None:
            self._count_partition()
        cnt = self._count
        # the count first, then every rank's count in one exchange: the step's one host read (the engine's
        # non-finite flags ride along); the selection is then sized without a sync
        if self._check_nonfinite:  # NaN never passes the threshold: this rank's own check rides along
            parts = self._exts + ([extremes(g[:self._checked])] if self._checked else [])
            rows = self.comm.exchange_control(torch.stack([cnt.reshape(()).to(torch.int64),
                                                           nonfinite_of(parts).to(torch.int64)]), "exdyna_counts")
            self._bad_ranks = [r for r, row in enumerate(rows) if row[1]]
        else:
            rows = self.comm.exchange_control(cnt.reshape(1), "exdyna_counts")
        ks_raw = [row[0] for row in rows]
        ks = [max(1, k) for k in ks_raw]  # an empty selection sends one element (the reference's fallback)
        fallback = ks_raw[self.rank] == 0
        if fallback:
            idx = torch.full((1,), st + t % (en - st), dtype=torch.int64, device=g.device)
        else:
            idx, _, _ = ops.threshold_select(g, self.threshold, st, en, count=ks_raw[self.rank])
        count = ks[self.rank]
        if self.distributed:
            padded = idx.new_zeros(max(ks))
            padded[:count] = idx
            gathered = self.comm.all_gather(padded, "exdyna_indices")
            union = torch.cat([gathered[r, :k] for r, k in enumerate(ks)])
            vals = self.comm.all_reduce(g[union], "exdyna_values").div_(n)
        else:
            union, vals = idx, g[idx]
        dense = self._output()
        # error feedback zeroes every globally selected coordinate, fused into the scatter's pass; the
        # partitions are exclusive, so the union holds no repeated index (order-independent sums)
        ops.scatter_add_(dense, union, vals, zero_in=g if self.error is not None else None)
        self._write_back(dense)

        total = sum(ks)
        self.k_prev, self.ks_prev = total, ks
        self.iteration += 1
        self.last = {"indices": idx, "union": union, "partition": p, "range": (st, en), "ks": ks,
                     "fallback": fallback}
        self._stats = {"density": total / self.numel, "target_density": o.density, "union_size": total,
                       "k_local": count, "imbalance": max(ks) * n / total - 1.0, "threshold": self.threshold,
                       "partition": p}
        self._end_step()

    def state_dict(self) -> dict:
        return {**self._base_state(), "threshold": self.threshold, "k_prev": self.k_prev,
                "ks_prev": list(self.ks_prev), "part": list(self.part), "pos": list(self.pos),
                "layout": (self.num_blocks, self.block_size, self.remainder)}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        if tuple(state["layout"]) != (self.num_blocks, self.block_size, self.remainder):
            raise ValueError(f"ExDynaReducer state has block layout {tuple(state['layout'])}, this model "
                             f"{(self.num_blocks, self.block_size, self.remainder)}")
        self.threshold = float(state["threshold"])
        self.k_prev = int(state["k_prev"])
        self.ks_prev = [int(k) for k in state["ks_prev"]]
        self.part = [int(x) for x in state["part"]]
        self.pos = [int(x) for x in state["pos"]]
