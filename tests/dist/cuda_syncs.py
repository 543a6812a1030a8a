"""CUDA synchronisations per optimizer step of every method, inside real DeepSpeed engines (run/gpu-check.sh, step 7).

    python tests/dist/cuda_syncs.py                     # a GPU host: 1-rank NCCL group, the table; exit 1 on a failure
    python tests/dist/cuda_syncs.py --cpu               # no GPU: gloo, every method runs its steps; nothing is counted
    deepspeed --num_gpus 2 tests/dist/cuda_syncs.py     # >= 2 GPUs: 2 NCCL ranks, each counts its own (rank 0 prints)
    python tests/dist/cuda_syncs.py --list              # the methods and their budgets

Without a launcher the process is rank 0 of a world of 1 and sets ``DS_EXT_FORCE_COLLECTIVES=1``
(``ds_ext.comm.Communicator.force_collectives``), so every ds_ext collective is issued to NCCL as it would be on
a cluster. The trainer's stop vote is on (``Attachment.vote_stop``), as in ``ds_ext.train``.

How it counts: ``torch.cuda.set_sync_debug_mode(1)`` ("warn") makes every CUDA call that synchronises the host
with the device (a device-to-host copy, ``.item()``, a blocking host-to-device copy, ``nonzero`` / ``unique``,
...) issue a Python warning. While a method is measured, ``warnings.showwarning`` is a hook that attributes each
one to the innermost Python frame outside torch (the call site, ``file:line function``) and to its owner:
``ds_ext`` (a frame under this repository's ``ds_ext/``), ``DeepSpeed`` (under the deepspeed package) or ``other``
(the training loop here, the model). Counting starts after ``--warmup`` optimizer steps (first-step allocations,
a Local SGD period); the batches are on the device before it starts.

Budget (``budget``): ds_ext's syncs per optimizer step <= 1 for every method, 2 for ``topk exchange=union`` (the union of
the ranks' indices has a data-dependent length). DeepSpeed's own syncs (under ZeRO 1/2: its overflow check and
gradient norm) are reported in their own column and not budgeted. A negative control (the consistency check
every step, which digests every parameter on the host) must exceed the budget: proof that syncs are seen at all.
The scenarios and budgets are the CPU counter's (tests/dist/workers_syncs.py), ZeRO 1 and 2 included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

def methods() -> dict:
    """The scenarios of the CPU counter on 2 ranks (``tests/dist/workers_syncs.py``: every reducer, sync and
    order, topk's exchanges, ZeRO 1 and 2, the negative control), run here on one rank."""
    from tests.dist.workers_syncs import scenarios_two_ranks

    return scenarios_two_ranks()


from tests.dist.workers_syncs import BUDGET  # noqa: E402  (after the sys.path line above)


def budget(name: str):
    """The CPU counter's budget (one rule: ``tests/dist/workers_syncs.py``); None for the negative control."""
    from tests.dist import workers_syncs

    return None if name == workers_syncs.CONTROL else workers_syncs.budget(name)


class SyncCounter:
    """``with SyncCounter() as c:`` counts torch's sync-debug warnings per (owner, site) in ``c.sites``
    (``cuda=False``: the warning hook alone, without touching the sync debug mode; for its test on CPU)."""

    def __init__(self, cuda: bool = True):
        import torch

        self.cuda = cuda
        self.torch_dir = str(Path(torch.__file__).resolve().parent) + os.sep
        try:
            import deepspeed

            self.ds_dir = str(Path(deepspeed.__file__).resolve().parent) + os.sep
        except ImportError:
            self.ds_dir = None
        self.pkg_dir = str(ROOT / "ds_ext") + os.sep
        self.sites: Counter = Counter()
        self.unattributed = 0

    def _site(self):
        f = sys._getframe(2)
        while f is not None:
            path = os.path.realpath(f.f_code.co_filename)
            if not (path.startswith(self.torch_dir) or f.f_code.co_filename == warnings.__file__
                    or f.f_code is SyncCounter._hook.__code__):
                break
            f = f.f_back
        if f is None:
            return None
        path = os.path.realpath(f.f_code.co_filename)
        owner = ("ds_ext" if path.startswith(self.pkg_dir) else
                 "DeepSpeed" if self.ds_dir and path.startswith(self.ds_dir) else "other")
        if "site-packages" + os.sep in path:  # an installed package (a venv inside the checkout too): from its name
            short = path.split("site-packages" + os.sep)[-1]
        else:
            short = os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path
        return owner, f"{short}:{f.f_lineno} {f.f_code.co_name}"

    def _hook(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._saved(message, category, filename, lineno, file, line)
        site = self._site()
        if site is None:
            self.unattributed += 1
        else:
            self.sites[site] += 1

    def __enter__(self):
        import torch

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._saved, warnings.showwarning = warnings.showwarning, self._hook
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(1)
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        self._catch.__exit__(*exc)  # puts showwarning and the filters back
        return False


def measure(name: str, spec: dict, device: str, warmup: int, steps: int) -> dict:
    """One method: a fresh engine, ``warmup`` optimizer steps, then ``steps`` counted (CUDA) or just run (CPU)."""
    import torch
    import torch.nn.functional as F

    import torch.distributed as dist

    import ds_ext
    from ds_ext.registry import ORDERS
    from tests.dist.workers import make_engine, rank_batches

    rank, world = dist.get_rank(), dist.get_world_size()
    gas, micro = spec.get("gas", 1), spec.get("micro", 8)
    rec = {"steps": 0, "sites": {}, "unattributed": 0, "error": None}
    engine = make_engine("fp32", gas, micro=micro, world=world, zero=spec.get("zero", 0))
    order = None
    if spec.get("order"):  # a long epoch: every measured microbatch is mid-epoch
        order = ORDERS.build(spec["order"], {}, 100 * gas * micro * world, rank, world, 0)
        order.plan(micro, gas, 100)
    att = ds_ext.attach(engine, spec["method"], order=order, check_every=spec.get("check_every", 0), nonfinite="skip")
    att.vote_stop(lambda: False)  # as ds_ext.train: a stop request is voted on every step
    dev = next(engine.module.parameters()).device
    batches = [(x.to(dev), y.to(dev)) for x, y in rank_batches(rank, (warmup + steps) * gas, micro, torch.float32)]
    counter, done = None, 0
    try:
        for i, (x, y) in enumerate(batches):
            if i == warmup * gas:
                done = att.steps
                if device == "cuda":
                    counter = SyncCounter().__enter__()
            engine.backward(F.cross_entropy(engine(x).float(), y))
            engine.step()
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    if counter is not None:
        rec["sites"] = {f"{owner}|{site}": n for (owner, site), n in counter.sites.items()}
        rec["unattributed"] = counter.unattributed
    rec["steps"] = att.steps - done
    att.detach()
    return rec


def verdict(name: str, rec: dict, device: str) -> str:
    """"" when the method is within its budget (CUDA) or ran (CPU), else why not."""
    if rec["error"]:
        return "error"
    if rec["steps"] <= 0:
        return "no optimizer step counted"
    if device != "cuda":
        return ""
    own = sum(n for k, n in rec["sites"].items() if k.startswith("ds_ext|")) / rec["steps"]
    b = budget(name)
    if b is None:
        return "" if own > BUDGET else "negative control NOT over budget: the counter sees nothing"
    return "" if own <= b else f"over budget ({own:.2f} > {b})"


def table(results: dict, device: str) -> str:
    lines = [f"{'method':<34} {'ds_ext/step':>11} {'budget':>6} {'DeepSpeed/step':>14} {'other/step':>10} "
             f"{'steps':>5}  verdict; ds_ext sites (DeepSpeed's, other)"]
    for name, rec in results.items():
        if rec["error"]:
            lines.append(f"{name:<34} {'ERROR':>11}  {rec['error'].splitlines()[0]}")
            continue
        s = max(rec["steps"], 1)
        by = {o: sum(n for k, n in rec["sites"].items() if k.startswith(o + "|")) / s for o in ("ds_ext", "DeepSpeed", "other")}
        b = budget(name)
        where = "; ".join(f"{k.split('|', 1)[0]}: {k.split('|', 1)[1]} x{n}" for k, n in sorted(rec["sites"].items(),
                                                                                                   key=lambda kv: (kv[0].split('|')[0] != 'ds_ext', kv[0])))
        v = verdict(name, rec, device) or ("ok" if device == "cuda" else "ran (cpu: not counted)")
        cols = (f"{by['ds_ext']:>11.2f} {('-' if b is None else b):>6} {by['DeepSpeed']:>14.2f} {by['other']:>10.2f}"
                if device == "cuda" else f"{'n/a':>11} {('-' if b is None else b):>6} {'n/a':>14} {'n/a':>10}")
        extra = f"; {rec['unattributed']} unattributed" if rec["unattributed"] else ""
        lines.append(f"{name:<34} {cols} {rec['steps']:>5}  {v}; {where or '-'}{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="no GPU: gloo on CPU tensors; the methods run, nothing is counted")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps before counting (default 3)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps counted (default 4)")
    ap.add_argument("--methods", nargs="*", help="only these methods (names as --list prints them)")
    ap.add_argument("--list", action="store_true", help="print the methods and their budgets, then exit")
    ap.add_argument("--json", help="also write the results here (rank 0)")
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    all_methods = methods()
    if args.list:
        for name in all_methods:
            b = budget(name)
            print(f"{name:<34} {'negative control (must exceed ' + str(BUDGET) + ')' if b is None else b}")
        return 0
    unknown = sorted(set(args.methods or ()) - set(all_methods))
    if unknown:
        ap.error(f"unknown methods {unknown}; see --list")
    import torch

    from ds_ext.comm import init_distributed

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device visible (torch.cuda.is_available() is False); --cpu runs the methods without counting")
    os.environ.setdefault("DS_EXT_FORCE_COLLECTIVES", "1")  # world 1: every collective still enters the backend
    init_distributed(300, backend="gloo" if args.cpu else "nccl")
    import torch.distributed as dist

    results = {}
    for name, spec in all_methods.items():
        if args.methods and name not in args.methods:
            continue
        try:
            results[name] = measure(name, spec, device, args.warmup, args.steps)
        except Exception as e:  # noqa: BLE001 -- reported in the table; the next method runs
            import traceback

            results[name] = {"steps": 0, "sites": {}, "unattributed": 0,
                             "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"}
    bad = {n: v for n, v in ((n, verdict(n, r, device)) for n, r in results.items()) if v}
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"\nCUDA syncs per optimizer step, {dist.get_backend()} world {world}"
              f"{' (DS_EXT_FORCE_COLLECTIVES=1)' if os.environ.get('DS_EXT_FORCE_COLLECTIVES') == '1' and world == 1 else ''},"
              f" DS_EXT_OPS={os.environ.get('DS_EXT_OPS') or 'auto'}, {args.warmup} warm-up + {args.steps} counted steps")
        print(table(results, device))
    for name, why in bad.items():  # every rank's own failures (each counts its own syncs)
        print(f"FAIL{f' (rank {rank})' if world > 1 else ''} {name}: {why}"
              + (f"\n{results[name]['error']}" if results[name]["error"] else ""))
    if rank == 0:
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device, "world": world, "results": results}, indent=1))
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
