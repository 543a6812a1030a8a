"""The communication meter: bytes each collective hands to the network, by kind.

Bytes are counted as the payload each method hands to collectives on this rank (tensor numel x
element size per all_reduce / all_gather call), not the algorithm-dependent wire traffic of the
collective itself (a ring all_reduce moves about 2(n-1)/n times its payload per rank).

The trainer's console progress, wandb logging and step timing live in ``ds_ext/trainer/records.py``.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    """What a metered kind's bytes are: the collective that carries them, what they are for, and the ranks it runs
    over (``scope``: ``node`` inside one node, ``world`` every rank, ``method`` the method's own group: the world,
    or the cross-node group of this local rank in hierarchical mode)."""
    op: Optional[str]
    purpose: str
    scope: str = "method"


#: the one table of the kinds that are not a method's own gradient exchange: ZeRO's collectives, hierarchical mode's
#: intra-node traffic, a synchronizer's parameter averaging (``node_zero_allgather``: ZeRO partitioned within the
#: node, hierarchical mode), an order's balancing (``order_balance``: the D-GraB order's pair-difference all_gather,
#: ``ds_ext/order/dgrab.py``). Every other kind is the method's gradient exchange (``EXCHANGE``), its op the one the
#: ``Communicator`` call names (``CommMeter.op_of``).
KINDS: Dict[str, Kind] = {
    "zero_allgather": Kind("all_gather", "ZeRO all-gather", "world"),
    "node_zero_allgather": Kind("all_gather", "ZeRO all-gather", "node"),
    "zero_reduce": Kind("all_reduce", "ZeRO reduction", "world"),
    "node_mean": Kind("all_reduce", "inside nodes", "node"),
    "node_gather": Kind("all_gather", "inside nodes", "node"),
    "param_allreduce": Kind("all_reduce", "parameter averaging"),
    "order_balance": Kind("all_gather", "order balancing"),
}
EXCHANGE = Kind(None, "gradient exchange")


def kind_of(kind: str) -> Kind:
    """A metered kind's properties (``KINDS``; any other kind: the method's gradient exchange)."""
    return KINDS.get(kind, EXCHANGE)


def purpose_of(kind: str) -> str:
    """What a kind's bytes are for, e.g. ``"parameter averaging"`` (the trainer names its byte totals with it)."""
    return kind_of(kind).purpose


def purpose_key(purpose: str) -> str:
    """A purpose as a metric-name fragment: ``"parameter averaging"`` -> ``"parameter_averaging"``."""
    return re.sub(r"[^a-z0-9]+", "_", purpose.lower()).strip("_")


class ByteCounts(dict):
    """Bytes by kind: a dict (``dict(...)``, ``==``, JSON as before) whose missing kinds count 0, as the
    ``defaultdict(int)`` it replaces, and which prints readably: ``{allreduce: 1.3 MiB, zero_allgather: 657.0 KiB}``."""

    def __missing__(self, key):
        return 0

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k}: {human_bytes(v)}" for k, v in self.items()) + "}"

    __str__ = __repr__


class CommMeter:
    """Bytes per rank by kind (module docstring). ``world_size`` (set by ``attach``; None: unknown): at 1 nothing
    crosses a network, which ``summary`` says instead of the payload the methods handed to skipped collectives."""

    def __init__(self):
        self.step_bytes = 0
        self.step_calls = 0
        self.total_bytes = 0
        self.total_calls = 0
        self.steps = 0
        self.by_kind: Dict[str, int] = ByteCounts()
        self.world_size: Optional[int] = None
        self.last_step_bytes = 0
        #: kind -> the collective its calls went through, as the ``Communicator`` named it
        self.ops: Dict[str, str] = {}

    def add(self, kind: str, nbytes: int, calls: int = 1, op: Optional[str] = None) -> None:
        self.step_bytes += int(nbytes)
        self.step_calls += calls
        self.by_kind[kind] += int(nbytes)
        if op is not None:
            self.ops[kind] = op

    def op_of(self, kind: str) -> Optional[str]:
        """The collective that carried ``kind``: as metered, else as ``KINDS`` declares it (None: unknown)."""
        return self.ops.get(kind) or kind_of(kind).op

    def end_step(self) -> int:
        """Close one optimizer step; returns the bytes of that step."""
        b = self.step_bytes
        self.total_bytes += b
        self.total_calls += self.step_calls
        self.steps += 1
        self.last_step_bytes = b
        self.step_bytes = 0
        self.step_calls = 0
        return b

    def by_purpose(self, exchange: str = "gradient exchange") -> Dict[str, int]:
        """Bytes grouped by what they were for (``KINDS``; every other kind under ``exchange``)."""
        out: Dict[str, int] = defaultdict(int)
        for kind, n in self.by_kind.items():
            out[KINDS[kind].purpose if kind in KINDS else exchange] += n
        return dict(out)

    def state_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "total_calls": self.total_calls, "steps": self.steps,
                "by_kind": dict(self.by_kind)}

    def load_state_dict(self, state: dict) -> None:
        self.total_bytes = int(state["total_bytes"])
        self.total_calls = int(state["total_calls"])
        self.steps = int(state["steps"])
        self.by_kind = ByteCounts(state.get("by_kind", {}))

    def summary(self) -> str:
        """Readable lines: the bytes per rank in total and per step, then one line per kind (total, per step, what
        it was for, the collective). At world size 1: "nothing communicated (world size 1)"."""
        if self.world_size == 1:
            return (f"nothing communicated (world size 1) over {self.steps} steps; the methods' collectives are "
                    f"skipped without other ranks")
        per = max(self.steps, 1)
        if not self.by_kind:
            return f"nothing metered over {self.steps} steps"
        lines = [f"{human_bytes(self.total_bytes)} per rank over {self.steps} steps "
                 f"({human_bytes(self.total_bytes / per)}/step)"]
        width = max(len(k) for k in self.by_kind)
        for kind, n in sorted(self.by_kind.items(), key=lambda kv: -kv[1]):
            op = self.op_of(kind)
            lines.append(f"  {kind:<{width}}  {human_bytes(n):>10}  {human_bytes(n / per):>10}/step  "
                         f"{purpose_of(kind)}{f' ({op})' if op else ''}")
        return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"
