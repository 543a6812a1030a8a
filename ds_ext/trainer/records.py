"""The trainer's run records: console progress, wandb logging, step timing.

Messages of this module go to its ``logging`` logger, except the trainer's own console output
(``Progress``), which prints.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

log = logging.getLogger(__name__)


class Progress:
    """Rank-0 progress over optimizer steps: a tqdm bar on a terminal; in a log file (not a TTY),
    one plain line every ~5% of training instead of carriage-return spam. Silent on other ranks.

    This is the trainer's console UI, so it prints (stderr) rather than logging through ``ds_ext``'s
    logger: it is built by ``ds_ext.trainer.loop`` only, never by library code a user embeds.

    ``enabled`` switches the progress display (``log.progress``); ``console`` (None: the same as
    ``enabled``) switches the messages of ``write`` (checkpoint paths, per-epoch validation), which are
    printed even when the progress display is off (the trainer passes ``console=(rank == 0)``)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train", console: Optional[bool] = None):
        self.bar = None
        self.enabled = enabled
        self.console = enabled if console is None else bool(console)
        self.total, self.n = total, initial
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            pf = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"[ds_ext] step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) {pf} "
                  f"elapsed {time.perf_counter() - self.t0:.1f}s", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        """One message line on stderr (flushed) when ``console`` is on; through the bar when there is one,
        so that the bar is redrawn below the line."""
        if not self.console:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
            sys.stderr.flush()
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


RUN_ID_FILE = "wandb_run_id"


def _new_run_id() -> str:
    """A fresh wandb run id (8 characters of [a-z0-9], as wandb's own)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger:
    """wandb on rank 0. ``offline`` (default) never touches the network; ``online`` falls back to
    offline when the service cannot be reached within the init timeout; ``disabled`` imports nothing
    and writes nothing.

    ``name``: the run name when ``cfg.name`` is unset (the trainer passes the recipe's ``name``, else the
    recipe file's stem). The run id is kept in ``<run_dir>/wandb_run_id``: a run started with
    ``resume=True`` (it continues a checkpoint) reuses the id found there, so its records go to the same
    wandb run (``wandb.init(id=..., resume="allow")``; offline, each segment is its own
    ``offline-run-*-<id>`` directory and ``wandb sync`` appends them to one run); a fresh run writes a new
    id. wandb keeps a run's steps increasing, so records of a run resumed from an older checkpoint than
    its last, at steps it had already logged, may be dropped by wandb (``summary.json`` has them)."""

    def __init__(self, cfg, run_dir: str, config: dict, enabled: bool, name: Optional[str] = None,
                 resume: bool = False):
        self.run = None
        self.run_id: Optional[str] = None
        if not enabled or cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DIR", run_dir)
        os.makedirs(run_dir, exist_ok=True)
        self.run_id = self._run_id(Path(run_dir) / RUN_ID_FILE, resume)
        import wandb

        kw = dict(project=cfg.project, entity=cfg.entity, name=cfg.name or name, tags=list(cfg.tags), config=config,
                  dir=run_dir, id=self.run_id, resume="allow")
        try:
            self.run = wandb.init(mode=cfg.mode, settings=wandb.Settings(init_timeout=60), **kw)
        except Exception as e:  # network trouble must not stop training
            log.warning("wandb %s init failed (%s); logging offline instead", cfg.mode, e)
            self.run = wandb.init(mode="offline", **kw)

    @staticmethod
    def _run_id(path: Path, resume: bool) -> str:
        if resume:
            try:
                got = path.read_text().strip()
            except OSError:
                got = ""
            if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", got):
                return got
        rid = _new_run_id()
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(rid + "\n")
        os.replace(tmp, path)
        return rid

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class StepWindow:
    """Step time and throughput over a logging window, from host-side timers only (no device read).

    ``step(samples)`` counts one optimizer step; ``read()`` returns ``(seconds per step, samples per
    second)`` since the previous ``read`` and opens the next window. Time inside ``paused()`` (checkpoint
    saves, evaluation) is left out. The trainer reads it right after the loss read of a logging step, so
    the work queued on an accelerator up to that step is inside the window it belongs to."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps = 0
        self.samples = 0
        self.excluded = 0.0

    def step(self, samples: int) -> None:
        self.steps += 1
        self.samples += int(samples)

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def read(self) -> Tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.t0 - self.excluded, 1e-9)
        out = (dt / max(self.steps, 1), self.samples / dt)
        self.t0, self.steps, self.samples, self.excluded = now, 0, 0, 0.0
        return out


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt
