"""How much of a reducer's post-backward ``finish()`` its gradient-ready hooks take over (issue 29).

    python -m benchmarks.overlap_share [--model resnet50] [--reps 5] [--world 1] [--methods topk,exdyna,...]

One process, ``--world`` loopback ranks (``ds_ext.testing.LoopbackWorld``: one thread per rank, collectives are
copies in memory; 1: no collectives), torch on one thread, the model's gradient shapes filled with N(0, 1)
values (per rank). Times are CPU time of the rank's thread (``time.thread_time``: waiting for the other ranks is
not counted, and a loaded machine inflates it less than wall time), averaged over the ranks. Per method, ``--reps``
steps each way, median:

* ``before``: no ``grad_ready`` call, everything in ``finish()`` (signsgd and powersgd with ``pipelined: false``);
* ``after``: ``grad_ready`` for every parameter in reverse registration order (as backward), then ``finish()``.

Printed per method: finish before / after, the hooks' total and their last call (work in the last hook ends with
backward, so it is not overlapped with it), and the share of ``finish()`` moved out of it,
``1 - after / before``. At world size 1 ExDyna's partition is the whole vector, so its partition count runs in the
last hook; with W ranks rank r's partition completes when its last gradient does. ExDyna's threshold starts at
3.29 (|N(0,1)| >= 3.29 holds for 0.1 % of the values: density 0.001); every step starts from a zero residual
and ExDyna from its first step, so every repetition does the same work."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

DEFAULTS = {"topk": {"density": 0.001}, "exdyna": {"density": 0.001, "initial_threshold": 3.29},
            "signsgd": {}, "powersgd": {"rank": 4, "start_powerSGD_iter": 0}}


def measure(name: str, shapes, reps: int, hooks: bool, comm=None) -> dict:
    from ds_ext.registry import REDUCERS, load_builtin

    load_builtin()
    opts = dict(DEFAULTS[name])
    if not hooks and name in ("signsgd", "powersgd"):
        opts["pipelined"] = False
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    red = REDUCERS.build(name, opts, [(f"p{i}", p) for i, p in enumerate(params)], comm=comm)
    g = torch.Generator().manual_seed(0 if comm is None else comm.rank)
    grads = [torch.randn(s, generator=g) for s in shapes]
    fin, hook, last = [], [], []
    for _ in range(reps + 1):  # the first is a warm-up
        for p, x in zip(params, grads):
            p.grad = x.clone()
        if getattr(red, "error", None) is not None:  # every step alike: the residual would otherwise grow
            red.error.zero_()                         # step by step (the same gradient each time) and
        if name == "exdyna":                          # ExDyna's density with it
            red.iteration = 0
        t0 = time.thread_time()
        tl = t0
        if hooks:
            for p in reversed(params):
                tl = time.thread_time()
                red.grad_ready(p)
        t1 = time.thread_time()
        red.finish()
        t2 = time.thread_time()
        fin.append(t2 - t1)
        hook.append(t1 - t0)
        last.append(t1 - tl if hooks else 0.0)
    med = lambda xs: 1e3 * statistics.median(xs[1:])  # noqa: E731
    return {"finish_ms": med(fin), "hooks_ms": med(hook), "last_hook_ms": med(last),
            "spread_ms": 1e3 * (max(fin[1:]) - min(fin[1:]))}


def measure_world(name: str, shapes, reps: int, hooks: bool, world: int) -> dict:
    """``measure`` on every rank of a loopback world, averaged over the ranks."""
    if world == 1:
        return measure(name, shapes, reps, hooks)
    from ds_ext.testing import LoopbackWorld

    res = LoopbackWorld(world).run(lambda comm: measure(name, shapes, reps, hooks, comm))
    return {k: sum(r[k] for r in res) / world for k in res[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--methods", default="topk,exdyna,signsgd,powersgd")
    ap.add_argument("--world", type=int, default=1, help="loopback ranks (threads in this process)")
    a = ap.parse_args(argv)
    from ds_ext.costmodel.model import model_shapes

    torch.set_num_threads(1)
    shapes = [tuple(s) for s in model_shapes(a.model)]
    print(f"# {a.model}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes)} elements; world size "
          f"{a.world} (loopback), CPU ms of each rank's thread, median of {a.reps} (spread max-min of finish), "
          f"mean over ranks")
    print(f"{'method':9} {'finish before':>14} {'finish after':>13} {'hooks':>7} {'last hook':>10} {'moved':>6}")
    for m in a.methods.split(","):
        b = measure_world(m, shapes, a.reps, False, a.world)
        n = measure_world(m, shapes, a.reps, True, a.world)
        moved = 1.0 - n["finish_ms"] / b["finish_ms"]
        print(f"{m:9} {b['finish_ms']:8.1f} +-{b['spread_ms']:4.0f} {n['finish_ms']:7.1f} +-{n['spread_ms']:4.0f} "
              f"{n['hooks_ms']:7.1f} {n['last_hook_ms']:10.1f} {100 * moved:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
