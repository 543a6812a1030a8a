"""One rank for tests/e2e/test_signals.py: a gloo process group, the ds_ext watchdog, a loop of collectives.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (as the deepspeed launcher sets them).
``python tests/e2e/workers_signals.py --on-signal save|exit [--block-on-stop] [--loader-workers N
[--loader-init plain]] [--fork-child]``

Each step: ``faults.progress(step, "collective")``, an all_reduce of a small tensor, then (like the
trainer) the ranks agree on their stop requests with an all_reduce (max) of ``faults.stop_code()``,
so that they all stop at the same step (``faults.stop_agreed``); then each prints ``saved at step
S``, closes the watchdog with ``EXIT_PREEMPTED`` and exits 75. ``ready at step 1`` is printed once
the collectives run (a signal sent earlier would find Python's default handlers). Failures of
collectives go through ``faults.explain_failure`` as in the trainer.

* ``--block-on-stop``: a rank that was itself asked to stop prints ``blocking at step S`` and blocks
  for good instead (in a ``recv`` that no rank answers; with one rank, in a plain wait), so that only
  a repeat signal can end it.
* ``--loader-workers N``: each step also takes a batch from a DataLoader with N forked workers (in
  the rank's process group, so a Ctrl-C or the launcher's tree-wide SIGTERM reaches them too); they
  call ``faults.ignore_stop_signals`` unless ``--loader-init plain``.
* ``--fork-child``: a forked child that waits for good, holding copies of the rank's sockets.

With ``WORLD_SIZE=1`` there is no process group and torch is not even imported (``ds_ext/trainer/faults.py``
is loaded on its own: the signal handling does not depend on torch, and the tests start faster).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

if os.environ.get("WORLD_SIZE") == "1":
    # faults.py only needs the standard library; loaded on its own it spares the package's torch import
    import importlib.util

    _spec = importlib.util.spec_from_file_location("ds_ext_faults", Path(__file__).resolve().parents[2]
                                                   / "ds_ext" / "trainer" / "faults.py")
    faults = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(faults)
else:
    from ds_ext.trainer import faults  # noqa: E402

MAX_STEPS = 100_000
STEP_COMPUTE_S = 0.01  # stands in for a step's computation, so the loop does not spin two cores


def say(line: str) -> None:
    print(line, flush=True)


class Numbers:
    """A map-style dataset that does not run out."""

    def __len__(self) -> int:
        return 10 ** 9

    def __getitem__(self, i: int) -> int:
        return i


def as_list(batch: list) -> list:
    return batch


def init_worker(worker_id: int) -> None:
    say(f"loader worker pid {os.getpid()}")


def init_worker_ignoring(worker_id: int) -> None:
    faults.ignore_stop_signals(worker_id)  # torch's own SIGTERM handler would kill the worker
    init_worker(worker_id)


class Collectives:
    """gloo for two ranks or more; nothing at all for one."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        if world > 1:
            import torch
            import torch.distributed as dist

            self.torch, self.dist = torch, dist
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
            self.x = torch.ones(4)

    def all_reduce(self) -> None:
        if self.world > 1:
            self.dist.all_reduce(self.x)
            self.x.fill_(1.0)

    def max(self, value: int) -> int:
        """The largest of the ranks' values (all_reduce, max)."""
        if self.world == 1:
            return value
        t = self.torch.tensor([value], dtype=self.torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())

    def loader(self, workers: int, ignore: bool):
        """An endless iterator over a DataLoader with ``workers`` forked worker processes."""
        from torch.utils.data import DataLoader

        # batches stay lists of ints: a tensor would travel by file descriptor, and a rank's os._exit in
        # the middle of that makes the worker's multiprocessing thread print a ConnectionResetError
        # traceback (torch's behaviour on any abrupt exit, not what these tests look at)
        return iter(DataLoader(Numbers(), batch_size=4, num_workers=workers, collate_fn=as_list,
                               worker_init_fn=init_worker_ignoring if ignore else init_worker))

    def block(self) -> None:
        """Block for good: in a C++ receive that no rank answers (or a plain wait with one rank)."""
        if self.world > 1:
            self.dist.recv(self.torch.zeros(1), src=(self.rank + 1) % self.world)
        else:
            threading.Event().wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--on-signal", choices=faults.ON_SIGNAL, default="exit")
    ap.add_argument("--block-on-stop", action="store_true")
    ap.add_argument("--loader-workers", type=int, default=0, help="a DataLoader with this many (forked) workers "
                    "gives each step a batch; each worker prints 'loader worker pid P'")
    ap.add_argument("--loader-init", choices=("ignore", "plain"), default="ignore",
                    help="ignore: the workers call faults.ignore_stop_signals (else torch's SIGTERM handler)")
    ap.add_argument("--fork-child", action="store_true", help="fork a child that prints 'forked child pid P' "
                    "and waits for good (it keeps copies of every socket the rank had at the fork)")
    args, _ = ap.parse_known_args()  # the deepspeed launcher adds --local_rank=N
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    coll = Collectives(rank, world)
    faults.progress(0, "start-up")
    wd = faults.Watchdog.start(rank, world, on_signal=args.on_signal)
    if wd is None:
        faults.install_signal_handlers(args.on_signal)
    say(f"rank {rank}: watchdog {'on' if wd is not None else 'off'}, on_signal={args.on_signal}")
    batches = coll.loader(args.loader_workers, args.loader_init == "ignore") if args.loader_workers else None
    if args.fork_child and os.fork() == 0:
        say(f"forked child pid {os.getpid()}")
        threading.Event().wait()
        os._exit(0)
    try:
        for step in range(1, MAX_STEPS):
            faults.progress(step, "collective")
            if batches is not None:
                next(batches)
            coll.all_reduce()
            time.sleep(STEP_COMPUTE_S)
            if step == 1:
                say(f"ready at step {step}")
            if args.block_on_stop and faults.stop_requested():
                faults.progress(step, "blocked on purpose")
                say(f"blocking at step {step}")
                coll.block()
            code = coll.max(faults.stop_code())
            if code:
                faults.stop_agreed(code)
                faults.progress(step, "checkpoint save")
                say(f"saved at step {step}")
                if wd is not None:
                    wd.close(faults.EXIT_PREEMPTED, f"preempted by {faults.stop_requested()}")
                else:
                    faults.restore_signal_handlers()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(faults.EXIT_PREEMPTED)
    except BaseException as e:
        faults.explain_failure(e, wd, rank)  # a failed collective: one line and the process ends
        raise
    say("no stop request within the step limit")
    if wd is not None:
        wd.close(3, "step limit")
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
