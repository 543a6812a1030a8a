"""``dssync`` -- DS-Sync (Wang et al., arXiv 2007.03298, "Divide-and-Shuffle Synchronization"): the
world is divided into G groups of world/G ranks; at each sync every group averages its parameters
(and BN running statistics) among its members only, dividing by the actual group size, with groups
reshuffled each time by a permutation every rank draws from the same seeded generator
(``grouping: shuffle``) or taken from a fixed cyclic list of patterns (``grouping: patterns``; the
reference's 4-worker alternation {0,1}{2,3} / {0,3}{1,2} is the default for 4 ranks and 2 groups).
It composes with any period: averaging in shuffled groups every H steps (``period: qsr``) is valid.

Deliberate deviations from the reference code, named (DS-Sync):
* Pattern counter at epoch boundaries (``pattern_restart``, ``DSSync.pattern_index``). The reference is
  split: its CIFAR-10/100 scripts (iteration counter passed by value into ``train()``) and its DeepFM
  script (iteration within the epoch) restart the counter every epoch, so when an epoch has an odd
  number of syncs the first pattern runs twice in a row at each boundary; its ImageNet and SQuAD
  scripts count over the whole run. ``never`` (default) alternates strictly by sync count;
  ``epoch`` restarts every epoch. ``never`` is the default because the paper's method reshuffles the
  groups at every synchronisation, not per epoch; a repeated pattern re-averages groups that were just
  averaged (with the default 4-rank patterns, A then B is the exact global mean, A then A is not),
  which delays consensus by one sync at every odd-length epoch; the sequence depends neither on the
  epoch length (world size, batch sizes, ``train.steps_per_epoch``, D-GraB's plan) nor on the caller
  having epochs at all (``attach`` from a user's loop; ``epoch`` needs ``steps_per_epoch``); and runs
  and checkpoints made before the option keep their sequence.
* DS-Sync averages one fused flat buffer per sync (the reference: one allreduce per parameter tensor)
  and divides by the group size (the reference divides by world/2, right only for 2 groups).
* DS-Sync averages after the optimizer step (as the reference's SQuAD / DeepFM scripts; its CIFAR and
  ImageNet scripts average before the forward pass -- the same sequence shifted by one step).
* The shuffle permutation is drawn from a generator seeded by (seed, sync index), so a resumed run
  continues the same sequence. By default each sync draws one of ``shuffle_pool`` (16) seeded
  partitions rather than a fresh permutation (the reference): every member set needs a process group
  (an NCCL communicator: GPU memory, threads, and a world-wide ``ncclCommSplit`` when it is first
  made), and fresh draws at world 16, G=2 would make about 1,850 of them in 1,000 syncs; the pool
  bounds them to ``shuffle_pool x G``, each made once (the communicator's cache is sized to keep them
  all, so none is destroyed mid-run). ``shuffle_pool: 0`` draws freshly as the reference does (a
  warning at attach names the cost); the communicator's cache (``ds_ext.comm.Communicator.max_subgroups``,
  least recently used first) then bounds how many are alive. Groups are made lazily the first time a
  member set is needed -- by every rank, in the same order (making a group is collective) -- through
  the communicator.
* Evaluation between syncs scores the average model, as ``local`` (``averaging.EvalView``).
"""
from __future__ import annotations

import logging
import random
from typing import List, Literal, Optional

from pydantic import Field, model_validator

from ..registry import SYNCS
from .averaging import AveragingOptions, _Averaging, _averaging_collectives, _check_common, average

log = logging.getLogger(__name__)


class DSSyncOptions(AveragingOptions):
    h: int = Field(1, ge=1, description="steps between group averagings (the reference: every step)")
    avg_buffers: bool = Field(True, description="average BatchNorm running statistics within the group (as the reference)")
    groups: int = Field(2, ge=1, description="number of groups G (world size must be a multiple)")
    grouping: Literal["shuffle", "patterns"] = Field("shuffle", description="seeded reshuffle at each sync, or "
                                                                            "cycle through fixed patterns")
    patterns: Optional[List[List[List[int]]]] = Field(
        None, description="grouping 'patterns': list of patterns, each a list of G rank lists; default: "
                          "contiguous blocks, then blocks shifted by one rank")
    seed: int = Field(0, description="seed of the shared shuffle permutations")
    shuffle_pool: int = Field(16, ge=0, description="grouping 'shuffle': draw each sync's partition from this many "
                                                    "seeded partitions (bounds the process groups to pool x groups); "
                                                    "0: a fresh permutation every sync, as the reference")
    pattern_restart: Literal["never", "epoch"] = Field(
        "never", description="grouping 'patterns': 'never' alternates strictly by sync count over the run; 'epoch' "
                             "restarts the pattern counter every epoch, as the reference's CIFAR and DeepFM scripts")

    @model_validator(mode="after")
    def _restart_needs_patterns(self):
        if self.pattern_restart == "epoch" and self.grouping != "patterns":
            raise ValueError("pattern_restart 'epoch' applies to grouping 'patterns' (the reference's pattern counter); "
                             "grouping 'shuffle' draws each sync's partition from (seed, sync index)")
        return self


def default_patterns(world: int, groups: int) -> List[List[List[int]]]:
    """Contiguous blocks, then the blocks shifted by one rank (for 4 ranks, 2 groups: the reference's
    {0,1}{2,3} / {0,3}{1,2}, whose two averagings compose to the exact global mean)."""
    size = world // groups
    a = [list(range(k * size, (k + 1) * size)) for k in range(groups)]
    if groups in (1, world):
        return [a]
    b = [sorted(((k * size + j - 1) % world) for j in range(size)) for k in range(groups)]
    return [a, b]


@SYNCS.register("dssync", DSSyncOptions)
class DSSync(_Averaging):
    """DS-Sync: at each sync, average parameters within G disjoint groups that change every time."""

    def __init__(self, named_params, options: DSSyncOptions, **kw):
        super().__init__(named_params, options, **kw)
        n, g = self.world_size, options.groups
        problems = self.world_problems(options, n)
        if problems:
            raise ValueError("dssync: " + "; ".join(f"{k}: {m}" for k, m in problems))
        self.group_size = n // g
        self.rank = self.comm.rank
        if options.grouping == "patterns":
            self.patterns = options.patterns or default_patterns(n, g)
        self.pool = [self._permutation(i) for i in range(options.shuffle_pool)] \
            if options.grouping == "shuffle" else []
        if options.pattern_restart == "epoch" and not self.steps_per_epoch:
            raise ValueError("dssync: pattern_restart 'epoch' needs the run's optimizer steps per epoch (the "
                             "synchronizer's steps_per_epoch, handed in by attach); use pattern_restart 'never'")
        self._size_group_cache(n, g)
        # pattern_restart 'epoch': the epoch the syncs are being counted in, and how many it has had
        self.count_epoch, self.epoch_syncs = 0, 0
        self.last_grouping: Optional[List[List[int]]] = None

    def partners(self) -> str:
        o = self.options
        how = (f"shuffled at every sync (seeded, a pool of {o.shuffle_pool})" if o.grouping == "shuffle" and o.shuffle_pool
               else "shuffled at every sync (seeded)" if o.grouping == "shuffle"
               else f"cycling through {len(self.patterns)} pattern(s)")
        return f"within {o.groups} groups of {self.group_size} ranks, {how}"

    def _size_group_cache(self, n: int, g: int) -> None:
        """Every grouping of a bounded sequence (patterns, or the shuffle pool) keeps its process groups for the
        run: each is made once, the first time it is used, and none is destroyed mid-run (issue 27 N5: a pool
        of 16 at G >= 5 overflowed the 64-entry cache, so most syncs made and destroyed groups). Fresh draws
        (``shuffle_pool: 0``) cannot be bounded: said once, at attach."""
        if not 1 < self.group_size < n:
            return
        groupings = len(self.patterns) if self.options.grouping == "patterns" else len(self.pool)
        if groupings:
            need = groupings * g
            self.comm.max_subgroups = max(self.comm.max_subgroups, self.comm.live_subgroups + need)
            log.info("dssync: %d groupings x %d groups: at most %d process groups, each made once when first used "
                     "(a collective every rank enters; on NCCL one communicator each), this rank in at most %d",
                     groupings, g, need, groupings)
        else:
            log.warning("dssync: shuffle_pool 0 draws a fresh partition at every sync: %d new process groups per "
                        "sync (a collective every rank enters; on NCCL a communicator split each), the oldest "
                        "destroyed past %d; the default shuffle_pool (16) makes each group once", g,
                        self.comm.max_subgroups)

    def pattern_index(self) -> int:
        """The index of the sync being made now into the grouping sequence (``grouping(index)``); in
        ``epoch`` mode it also advances the per-epoch count.

        ``pattern_restart: never``: the number of syncs made so far (``rounds``), over the whole run, as
        the reference's ImageNet and SQuAD scripts count. ``epoch``: the number of syncs made so far in
        the epoch of the step just taken (epoch ``(step_ctr - 1) // steps_per_epoch``), restarting at 0
        with every epoch, as its CIFAR-10/100 and DeepFM scripts count (the CIFAR loop receives its
        counter by value, so it restarts; DeepFM indexes by the iteration within the epoch). With h = 1
        the sync after step s of an epoch uses pattern s % len(patterns): DeepFM's sequence exactly, and
        CIFAR's with its averaging made after step s instead of before it (as every averaging here)."""
        if self.options.pattern_restart == "never":
            return self.rounds
        epoch = (self.step_ctr - 1) // self.steps_per_epoch
        if epoch != self.count_epoch:
            self.count_epoch, self.epoch_syncs = epoch, 0
        index = self.epoch_syncs
        self.epoch_syncs += 1
        return index

    @property
    def synced_globally(self) -> bool:
        return self.in_sync and (self.options.groups == 1 or self.period.data_parallel(self.step_ctr - 1))

    def grouping(self, index: int) -> List[List[int]]:
        """The groups of sync number ``index`` (identical on every rank)."""
        o = self.options
        g, s = o.groups, self.group_size
        if o.grouping == "patterns":
            return [sorted(grp) for grp in self.patterns[index % len(self.patterns)]]
        if self.pool:
            perm = self.pool[random.Random(o.seed * 1_000_003 + index).randrange(len(self.pool))]
        else:
            perm = self._permutation(index)
        return [sorted(perm[k * s:(k + 1) * s]) for k in range(g)]

    def _permutation(self, index: int) -> List[int]:
        """A seeded permutation of the ranks (host arithmetic only: nothing is read from a tensor)."""
        perm = list(range(self.world_size))
        random.Random((self.options.seed * 1_000_003 + index) % 2**63).shuffle(perm)
        return perm

    def _average_now(self) -> None:
        index = self.pattern_index()
        if self.group_size == 1:
            return
        groups = self.grouping(index)
        self.last_grouping = groups
        mine = None
        for grp in groups:  # every rank makes every group's communicator, in the same order (collective)
            c = self.comm.subgroup(grp) if self.group_size < self.world_size else self.comm
            if self.rank in grp:
                mine = c
        average(self._tensors(), mine, self.group_size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "count_epoch": self.count_epoch, "epoch_syncs": self.epoch_syncs}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "count_epoch" in state:
            self.count_epoch, self.epoch_syncs = int(state["count_epoch"]), int(state["epoch_syncs"])
        elif self.options.pattern_restart == "epoch":  # a checkpoint from before the option: count afresh
            self.count_epoch, self.epoch_syncs = -1, 0

    @classmethod
    def collectives(cls, shapes, world: int, options: DSSyncOptions, lr: float = 0.0, **_) -> list:
        """One fp32 all_reduce of the parameters within a group of world/G ranks every H steps."""
        return _averaging_collectives(shapes, world // options.groups, options, lr)

    @classmethod
    def check(cls, view) -> list:
        """The shared rules, and (world size known) ``world_problems``."""
        problems = _check_common(view, "dssync")
        o, world = view.options.get("sync"), view.world
        if o is None or world is None:
            return problems
        return problems + cls.world_problems(o, world)

    @staticmethod
    def world_problems(o: DSSyncOptions, world: int) -> list:
        """G groups of world/G ranks; patterns that split ranks 0..world-1 into them."""
        g = o.groups
        if world % g:
            divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
            return [("method.sync.groups", f"groups={g} does not divide the world size {world}; allowed: {divisors}")]
        problems = []
        if o.grouping == "patterns" and o.patterns is not None:
            from ..spec import _short

            size = world // g
            for i, pat in enumerate(o.patterns):
                flat = sorted(r for grp in pat for r in grp)
                if flat != list(range(world)) or len(pat) != g or any(len(grp) != size for grp in pat):
                    problems.append((f"method.sync.patterns.{i}", f"{_short(pat)} must split ranks 0..{world - 1} into "
                                                                  f"{g} groups of {size} (each rank exactly once)"))
        return problems
