"""Fault injection (tests only): ``DS_EXT_FAULT=<phase>:<rank>:<step>`` makes that rank send itself
SIGKILL (a real kill of the real process, after one line on stderr with the time) when it reaches
``point(phase, step)``; ``<phase>:<rank>:<step>:stop`` sends SIGSTOP instead (a rank that is alive
but stuck: its sockets stay open). Phases:

* ``data``: fetching the first micro-batch of optimizer step ``step``;
* ``collective``: after the backward of the last micro-batch of step ``step``, with the reducer's
  gradient collectives launched, before ``engine.step()`` waits for them;
* ``checkpoint.save`` for the checkpoint taken after step ``step``: ``ckpt_start`` (staging
  directory made), ``ckpt_deepspeed`` (DeepSpeed's files written), ``ckpt_rankfile`` (this rank's
  ds_ext file written), ``ckpt_meta`` (rank 0: ``meta.json`` written in staging), ``ckpt_replace``
  (rank 0, only when the tag exists already: the old copy moved aside, the new one not yet in
  place), ``ckpt_rename`` (rank 0: renamed into place, ``latest`` not yet replaced), ``ckpt_latest``
  (rank 0: ``latest`` replaced, nothing pruned), ``ckpt_prune`` (rank 0: an old checkpoint renamed
  away, not yet deleted), ``ckpt_end`` (after the final barrier).
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional, Tuple

from .common import _say

PHASES = ("data", "collective", "ckpt_start", "ckpt_deepspeed", "ckpt_rankfile", "ckpt_meta", "ckpt_replace",
          "ckpt_rename", "ckpt_latest", "ckpt_prune", "ckpt_end")
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


class FaultSpecError(ValueError):
    """A malformed ``DS_EXT_FAULT`` value."""


_fault: Optional[Tuple[str, int, int, str, str]] = None  # (phase, rank, step, action, raw) for this rank
_fault_rank = -1


def load_fault_plan(rank: int, env: Optional[Dict[str, str]] = None) -> None:
    """Read ``DS_EXT_FAULT`` for this rank; raise ``FaultSpecError`` naming the variable and value."""
    global _fault, _fault_rank
    raw = (env if env is not None else os.environ).get("DS_EXT_FAULT", "").strip()
    _fault, _fault_rank = None, rank
    if not raw:
        return
    parts = raw.split(":")
    if len(parts) == 3:
        parts.append("kill")
    if (len(parts) != 4 or parts[0] not in PHASES or not parts[1].isdigit() or not parts[2].isdigit()
            or parts[3] not in ACTIONS):
        raise FaultSpecError(f"DS_EXT_FAULT={raw!r}: expected <phase>:<rank>:<step>[:kill|stop] with phase one of "
                             f"{', '.join(PHASES)} and non-negative integers")
    if int(parts[1]) == rank:
        _fault = (parts[0], int(parts[1]), int(parts[2]), parts[3], raw)


def point(phase: str, step: int) -> None:
    """A fault-injection point: SIGKILL (or SIGSTOP) this process if ``DS_EXT_FAULT`` names this phase,
    rank and step. It fires once (``data`` is reached once per micro-batch: a stopped rank that is
    continued must not stop again at the next micro-batch of the same step)."""
    global _fault
    f = _fault
    if f is None or f[0] != phase or f[2] != step:
        return
    _fault = None
    sig = ACTIONS[f[3]]
    _say(f"[ds_ext] fault injection DS_EXT_FAULT={f[4]}: {signal.Signals(sig).name} rank {_fault_rank} "
         f"(pid {os.getpid()}) in {phase} at step {step} t={time.time():.3f}")
    os.kill(os.getpid(), sig)

