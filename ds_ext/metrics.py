"""Communication meter, console progress and wandb logging.

Bytes are counted as the payload each method hands to collectives on this rank (tensor numel x
element size per all_reduce / all_gather call), not the algorithm-dependent wire traffic of the
collective itself (a ring all_reduce moves about 2(n-1)/n times its payload per rank).
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from typing import Dict, Optional


#: what a kind's bytes are for, where it is not the method's gradient exchange (a reducer's or an order's own
#: kinds): ZeRO's collectives, hierarchical mode's intra-node traffic, a synchronizer's parameter averaging
#: (``node_zero_allgather``: ZeRO partitioned within the node, hierarchical mode; inside nodes too)
PURPOSES = {"zero_allgather": "ZeRO all-gather", "node_zero_allgather": "ZeRO all-gather", "zero_reduce": "ZeRO reduction",
            "node_mean": "inside nodes", "node_gather": "inside nodes", "param_allreduce": "parameter averaging"}


class CommMeter:
    def __init__(self):
        self.step_bytes = 0
        self.step_calls = 0
        self.total_bytes = 0
        self.total_calls = 0
        self.steps = 0
        self.by_kind: Dict[str, int] = defaultdict(int)
        self.last_step_bytes = 0

    def add(self, kind: str, nbytes: int, calls: int = 1) -> None:
        self.step_bytes += int(nbytes)
        self.step_calls += calls
        self.by_kind[kind] += int(nbytes)

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
        """Bytes grouped by what they were for (``PURPOSES``; every other kind under ``exchange``)."""
        out: Dict[str, int] = defaultdict(int)
        for kind, n in self.by_kind.items():
            out[PURPOSES.get(kind, exchange)] += n
        return dict(out)

    def state_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "total_calls": self.total_calls, "steps": self.steps,
                "by_kind": dict(self.by_kind)}

    def load_state_dict(self, state: dict) -> None:
        self.total_bytes = int(state["total_bytes"])
        self.total_calls = int(state["total_calls"])
        self.steps = int(state["steps"])
        self.by_kind = defaultdict(int, state.get("by_kind", {}))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} TiB"


class Progress:
    """Rank-0 progress over optimizer steps: a tqdm bar on a terminal; in a log file (not a TTY),
    one plain line every ~5% of training instead of carriage-return spam. Silent on other ranks.

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


class WandbLogger:
    """wandb on rank 0. ``offline`` (default) never touches the network; ``online`` falls back to
    offline when the service cannot be reached within the init timeout; ``disabled`` imports nothing."""

    def __init__(self, cfg, run_dir: str, config: dict, enabled: bool):
        self.run = None
        if not enabled or cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DIR", run_dir)
        os.makedirs(run_dir, exist_ok=True)
        import wandb

        kw = dict(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags), config=config,
                  dir=run_dir)
        try:
            self.run = wandb.init(mode=cfg.mode, settings=wandb.Settings(init_timeout=60), **kw)
        except Exception as e:  # network trouble must not stop training
            print(f"[ds_ext] wandb {cfg.mode} init failed ({e}); logging offline instead", file=sys.stderr)
            self.run = wandb.init(mode="offline", **kw)

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt
