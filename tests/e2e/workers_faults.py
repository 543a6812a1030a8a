"""Helpers for tests/e2e/test_faults.py: trainer ranks as plain processes, the deepspeed launcher, and
checks on a checkpoint directory.

``spawn`` starts ``python -m ds_ext.train`` once per rank with the environment the deepspeed launcher
gives its children (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR/PORT) but without the
launcher, so nobody kills the survivors on their behalf: what they do after a peer dies is their
own doing. ``wait_all`` blocks on every process (one thread each, in ``Popen.wait``) with a deadline
and records the wall-clock time at which each one ended. Nothing sleeps.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tests import harness

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")
KILL_TIME = re.compile(r"fault injection DS_EXT_FAULT=\S+: SIG\w+ rank (\d+) .* t=([0-9.]+)")


def argv(run_dir, *sets: str, steps: int = 8) -> List[str]:
    """Quickstart for ``steps`` optimizer steps (one epoch), a checkpoint every 2 steps, keep 1."""
    base = ["train.epochs=1", f"train.steps_per_epoch={steps}", f"log.dir={run_dir}", "log.wandb.mode=disabled",
            "log.progress=false", "checkpoint.every_steps=2", "checkpoint.keep=1", *sets]
    out = ["--recipe", QUICK]
    for s in base:
        out += ["--set", s]
    return out


def _env(fault: Optional[str], extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DS_EXT_FAULT", None)
    if fault:
        env["DS_EXT_FAULT"] = fault
    env.update(extra or {})
    return env


class Ranks:
    """``world`` trainer processes; ``logs[r]`` is rank r's combined stdout + stderr file."""

    def __init__(self, world: int, args: List[str], log_dir: Path, fault: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, rank_env: Optional[Dict[int, Dict[str, str]]] = None,
                 preexec_fn=None):
        self.world, self.log_dir = world, Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = harness.free_port()
        self.procs: List[subprocess.Popen] = []
        self.logs: List[Path] = []
        self.ended: Dict[int, float] = {}
        for r in range(world):
            e = _env(fault, env)
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            e.update((rank_env or {}).get(r, {}))
            log = self.log_dir / f"rank{r}.log"
            with open(log, "wb") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-u", "-m", "ds_ext.train", f"--local_rank={r}",
                                                    *args], cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT,
                                                   preexec_fn=preexec_fn))
            self.logs.append(log)

    def wait_all(self, timeout: float) -> List[Optional[int]]:
        """Return codes (None: still running at the deadline, then killed)."""
        def waiter(r, p):
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                return
            self.ended[r] = time.time()

        threads = [threading.Thread(target=waiter, args=(r, p), daemon=True) for r, p in enumerate(self.procs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = [p.poll() for p in self.procs]
        self.kill_all()
        return codes

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()

    def text(self, r: int) -> str:
        return self.logs[r].read_text(errors="replace")

    def wait_stopped(self, r: int) -> None:
        """Block until rank ``r`` has stopped itself (``DS_EXT_FAULT=...:stop``): ``waitpid`` with
        ``WUNTRACED`` returns when the child stops (or ends); nothing is polled."""
        pid, status = os.waitpid(self.procs[r].pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), (status, self.text(r)[-3000:])

    def kill_time(self) -> Optional[float]:
        for r in range(self.world):
            m = KILL_TIME.search(self.text(r))
            if m:
                return float(m.group(2))
        return None


def run_ranks(world: int, args: List[str], log_dir: Path, fault: Optional[str] = None, timeout: float = 300,
              env: Optional[Dict[str, str]] = None):
    ranks = Ranks(world, args, log_dir, fault, env)
    codes = ranks.wait_all(timeout)
    return ranks, codes


def launch(n: int, args: List[str], fault: Optional[str] = None, timeout: float = 300):
    """The deepspeed launcher on ``n`` local processes; returns (CompletedProcess, end time)."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(n), "--master_port", str(harness.free_port()), "--module", "ds_ext.train",
           *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(fault), timeout=timeout)
    return p, time.time()


def assert_loadable(ckpt: Path, world: int) -> None:
    """Every file a resume reads is there and loads: meta.json, DeepSpeed's model states, the rank files."""
    import json

    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == world, meta
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert "module" in states and states["global_steps"] == int(ckpt.name.rsplit("_", 1)[1])
    for r in range(world):
        st = torch.load(ckpt / f"ds_ext_rank{r}.pt", map_location="cpu", weights_only=False)
        assert st["global_step"] == states["global_steps"]


def visible_checkpoints(ckpt_dir: Path) -> List[Path]:
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
