"""What an attachment says: at attach, one line per method; at the end, a readable summary.

* ``announce(att, total_steps)`` (called by ``attach``): rank 0 logs, at INFO on this module's logger, one line
  per method, each written by the method itself (``Reducer.describe``, ``Synchronizer.describe``,
  ``Order.describe`` when an order is attached), e.g. ``powersgd rank 4: 52 of 161 tensors compressed, ~13.0
  KiB/step vs 97.0 MiB uncompressed; plain allreduce until step 1000: start_powerSGD_iter``. A method whose
  plain-allreduce warm-up (``Reducer.warmup``) covers the whole run (``total_steps`` known) is also a WARNING:
  nothing would be compressed. At world size 1 a line says that nothing is communicated and how to launch data
  parallel. The lines are kept on the attachment (``Attachment.description``; the trainer prints them).
* ``ensure_console()``: a program that configured no logging at all would see none of these INFO lines (Python's
  last-resort handler shows WARNING and above only). Rank 0 then gets a stderr handler on the ``ds_ext`` logger
  (``[ds_ext] <message>``: INFO on rank 0, WARNING and above on every rank) and the logger's level INFO when it
  had none. The handler stays silent once any other handler would see the records (the user's
  ``logging.basicConfig``, the trainer's console, pytest's capture), so nothing is printed twice. A program that
  configures logging before ``attach`` keeps its configuration (records of INFO reach its handlers only if it
  enables INFO for ``ds_ext``).
* ``summary(att)``: ``Attachment.summary()``: the methods, the meter's ``CommMeter.summary()`` and skipped steps.
* ``wandb_lines(run)``: the wandb run's name, and ``wandb sync DIR`` for an offline run (the trainer's and the
  Hugging Face callback's last lines).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger(__name__)

#: the launcher command named at world size 1 (an own loop; the trainer names its own recipe command)
OWN_LOOP_LAUNCH = "deepspeed --num_gpus 2 your_script.py"


def world_one_line(launch: str = OWN_LOOP_LAUNCH) -> str:
    return (f"world size 1: nothing communicated (the methods run, their collectives are skipped); for data "
            f"parallel start every process with the launcher: {launch}")


def method_lines(att, total_steps: Optional[int] = None) -> List[str]:
    """Each method's own line (``describe`` hooks): the reducer, the synchronizer (when it has something to
    say), the order (when one is attached). Host arithmetic only; a hook that fails costs its line, never the run."""
    hooks = [lambda: att.reducer.describe(total_steps), att.sync.describe]
    if att.order is not None:
        hooks.append(att.order.describe)
    lines = []
    for hook in hooks:
        try:
            line = hook()
        except Exception as e:  # noqa: BLE001 -- a description is not worth stopping a run for
            log.debug("a method's describe() failed: %s: %s", type(e).__name__, e)
            line = f"{type(getattr(hook, '__self__', att.reducer)).__name__} (no description: {type(e).__name__})"
        if line:
            lines.append(line)
    return lines


def announce(att, total_steps: Optional[int] = None) -> List[str]:
    """Rank 0 logs ``method_lines`` (and, at world size 1, ``world_one_line``); returns the method lines."""
    lines = method_lines(att, total_steps)
    if att.comm.global_rank != 0:
        return lines
    ensure_console()
    for line in lines:
        log.info("%s", line)
    if not att.comm.distributed:
        log.info("%s", world_one_line())
    warm = att.reducer.warmup()
    if warm is not None and total_steps is not None and warm[0] >= total_steps:
        log.warning("%s compresses nothing in this run: %s %d >= the run's %d optimizer steps, so every step sends "
                    "a plain allreduce; set %s below %d (0: compress from the first step)", att.reducer.registered_name,
                    warm[1], warm[0], total_steps, warm[1], total_steps)
    return lines


def summary(att) -> str:
    """The attachment at the end of a run: its methods, the bytes per rank (``CommMeter.summary``), skipped steps."""
    names = [att.reducer.registered_name]
    from ..registry import ORDERS, SYNCS

    sync = SYNCS.name_of(att.sync)
    if sync and sync != "none":
        names.append(f"sync {sync}")
    if att.order is not None:
        names.append(f"order {ORDERS.name_of(att.order) or type(att.order).__name__}")
    text = f"ds_ext ({', '.join(names)}): {att.meter.summary()}"
    if att.skipped_steps:
        text += f"\n{att.skipped_steps} optimizer step(s) skipped for non-finite gradients"
    return text


def wandb_lines(run) -> List[str]:
    """Where a wandb run is: its name and URL (online) or ``wandb sync DIR`` (offline); [] without a run."""
    if run is None:
        return []
    name, rid = getattr(run, "name", None), getattr(run, "id", None)
    head = f"wandb run {name or rid}" + (f" (id {rid})" if name and rid and name != rid else "")
    if getattr(run, "offline", False):
        where = getattr(getattr(run, "settings", None), "sync_dir", None) or os.path.dirname(getattr(run, "dir", ""))
        return [f"{head}: offline; upload it with: wandb sync {where}"]
    url = getattr(run, "url", None)
    return [f"{head}: {url}" if url else head]


# ---- the console of a program that configured no logging ------------------------------------------------

def rank_now() -> int:
    """This process's rank: the process group's once it exists, else $RANK (the launcher's), else 0."""
    d = sys.modules.get("torch.distributed")
    if d is not None and d.is_available() and d.is_initialized():
        return d.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class FallbackHandler(logging.Handler):
    """``[ds_ext] <message>`` on the current ``sys.stderr`` while no other handler would show the record:
    INFO and above on rank 0, WARNING and above on every rank (``ensure_console``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("[ds_ext] %(message)s"))

    def _others(self, logger: logging.Logger) -> bool:
        c: Optional[logging.Logger] = logger
        while c is not None:
            if any(h is not self for h in c.handlers):
                return True
            if not c.propagate:
                return False
            c = c.parent
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if self._others(logging.getLogger(record.name)):
            return
        if record.levelno < logging.WARNING and rank_now() != 0:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 -- logging never raises into the caller
            self.handleError(record)


def ensure_console() -> Optional[FallbackHandler]:
    """Install ``FallbackHandler`` on the ``ds_ext`` logger when no handler anywhere would show its records
    (nothing configured); returns the installed handler (or the one installed before), else None."""
    lg = logging.getLogger("ds_ext")
    mine = next((h for h in lg.handlers if isinstance(h, FallbackHandler)), None)
    if mine is not None or lg.hasHandlers():
        return mine
    mine = FallbackHandler()
    lg.addHandler(mine)
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.INFO)
    return mine
