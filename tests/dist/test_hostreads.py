"""Issue 14: at most ONE host read (device-to-host synchronisation) per optimizer step in ds_ext's own
code, for every method, in steady state, on real 2-rank DeepSpeed engines (gloo, CPU).

The reads are counted by ``tests.dist.workers_hostreads.HostReadCounter`` (a ``TorchFunctionMode``; see its
docstring for what is counted and how a read is attributed to ds_ext). Every method gets a fresh
engine inside one spawned 2-rank run, with ``nonfinite="skip"`` (the default) and no consistency check;
the counter is active around steady-state steps only (after 3 warm-up steps: Local SGD and DS-Sync
have completed a period, D-GraB / CD-GraB are mid-epoch). ``ds_ext.ops`` runs its torch code
(``DS_EXT_OPS=torch``), whose reads are visible in Python. DS-Sync with real subgroups (groups 2) needs
4 ranks and runs in its own 4-rank run. A negative control in the same run (the consistency check
every step, which digests every parameter on the host) must be counted far over the budget, in ds_ext.

Run with ``-s`` to see the table (it is also in the assertion message).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from tests import harness
from tests.dist import workers_hostreads as W

BUDGET = 1  # host reads per optimizer step


def _table(results, title: str) -> str:
    """One row per method: the worst rank's reads per step, then every call site (file:line function
    x count over the measured steps, all ranks' sites merged), data-dependent-shape calls noted."""
    lines = [title, f"{'method':<34} {'reads/step':>10}  (file:line of each)"]
    for name in results[0]:
        recs = [r[name] for r in results]
        err = next((r["error"] for r in recs if r["error"]), None)
        if err:
            lines.append(f"{name:<34} {'ERROR':>10}  {err.splitlines()[0]}")
            continue
        per_step = max(sum(r["reads"].values()) / max(r["steps"], 1) for r in recs)
        sites = {}
        for r in recs:
            for (site, fn), n in r["reads"].items():
                sites[(site, fn)] = max(sites.get((site, fn), 0), n)
        where = ", ".join(f"{s} {fn} x{n}" for (s, fn), n in sorted(sites.items())) or "-"
        shaped = {}
        for r in recs:
            for (site, fn), n in r["shaped"].items():
                shaped[(site, fn)] = max(shaped.get((site, fn), 0), n)
        if shaped:
            where += "   [data-dependent shape, not a read here: " + ", ".join(
                f"{s} {fn} x{n}" for (s, fn), n in sorted(shaped.items())) + "]"
        lines.append(f"{name:<34} {per_step:>10.2f}  {where}   ({recs[0]['steps']} steps)")
    return "\n".join(lines)


def _over_budget(results, skip=()) -> list:
    bad = []
    for name in results[0]:
        if name in skip:
            continue
        for rank, r in enumerate(results):
            rec = r[name]
            if rec["error"]:
                bad.append(f"{name} (rank {rank}): {rec['error']}")
            elif rec["skipped"]:  # a skipped step is not the steady-state path
                bad.append(f"{name} (rank {rank}): {rec['skipped']} step(s) skipped for non-finite gradients")
            elif rec["steps"] == 0 or sum(rec["reads"].values()) > BUDGET * rec["steps"]:
                bad.append(f"{name} (rank {rank}): {sum(rec['reads'].values())} reads in {rec['steps']} steps")
    return bad


def test_one_host_read_per_step_every_method():
    results = harness.run_pooled(W.measure, 2, methods=W.methods_two_ranks(), timeout=240)
    table = _table(results, "host reads per optimizer step in ds_ext's frames (2 ranks, gloo, DS_EXT_OPS=torch)")
    print("\n" + table)
    # the negative control reads the host for every parameter: the counter must see it, in ds_ext
    ctl = results[0][W.CONTROL]
    assert ctl["error"] is None, ctl["error"]
    assert sum(ctl["reads"].values()) > 2 * ctl["steps"], table
    assert any(site.startswith("ds_ext/deepspeed/attach.py") and fn in ("cpu", "numpy") for site, fn in ctl["reads"]), table
    bad = _over_budget(results, skip={W.CONTROL})
    assert not bad, "over the budget of one host read per step:\n" + "\n".join(bad) + "\n\n" + table


def test_one_host_read_per_step_dssync_subgroups():
    """DS-Sync with 2 groups (real subgroups; groups must divide the world, so 4 ranks)."""
    results = harness.run_pooled(W.measure, 4, methods=W.methods_four_ranks(), timeout=240)
    table = _table(results, "host reads per optimizer step in ds_ext's frames (4 ranks, gloo)")
    print("\n" + table)
    bad = _over_budget(results)
    assert not bad, "over the budget of one host read per step:\n" + "\n".join(bad) + "\n\n" + table


# ------------------------------------------------------------------ the counter itself (in-process)
HERE = str(Path(__file__).resolve().parent) + os.sep  # a prefix that makes this file count as "ours"


def test_counter_sees_every_read_function():
    x = torch.tensor([0.5, -1.0, 2.0])
    with W.HostReadCounter(prefix=HERE) as c:
        x[0].item()
        x.tolist()
        bool(x[0] > 0)
        int(x[2])
        float(x[0])
        [1, 2, 3][torch.tensor(1)]  # __index__
        x.cpu()
        x.numpy()
        x.nonzero()
        torch.nonzero(x)
        if x[1] < 0:  # an implicit __bool__
            pass
    got = Counter(fn for (_, fn), n in c.reads.items() for _ in range(n))
    assert got == Counter({"item": 1, "tolist": 1, "__bool__": 2, "__int__": 1, "__float__": 1, "__index__": 1,
                           "cpu": 1, "numpy": 1, "nonzero": 2}), got
    assert all(site.startswith("tests/dist/test_hostreads.py:") for site, _ in c.reads), c.reads
    assert not c.foreign


def test_counter_attributes_reads_to_the_nearest_frame_outside_torch():
    """A read made inside torch on behalf of a caller belongs to the caller: ``clip_grad_norm_(...,
    error_if_nonfinite=True)`` tests its norm with ``__bool__`` in torch/nn/utils/clip_grad.py. Reads
    outside the prefix are kept apart (``foreign``)."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with W.HostReadCounter(prefix=HERE) as ours:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    (site, fn), = ours.reads
    assert fn == "__bool__" and site.startswith("tests/dist/test_hostreads.py:"), ours.reads
    with W.HostReadCounter(prefix="/nonexistent/") as other:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert not other.reads
    (site2, fn2), = other.foreign
    assert fn2 == "__bool__" and site2.startswith("tests/dist/test_hostreads.py:"), other.foreign


def test_counter_counts_reads_in_ds_ext_frames():
    """``ds_ext.deepspeed.attach.parameter_fingerprint`` reads every parameter on the host (``.cpu()`` and
    ``.numpy()``): two reads per parameter at one ds_ext site, counted with the default prefix."""
    from ds_ext.deepspeed.attach import parameter_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 4 parameters
    with W.HostReadCounter() as c:
        parameter_fingerprint(model)
        torch.ones(2).sum().item()  # this file is not ds_ext: not counted as ours
    assert c.total == 8, c.reads
    sites = {site for site, _ in c.reads}
    assert len(sites) == 1 and next(iter(sites)).startswith("ds_ext/deepspeed/attach.py:"), sites
    assert {fn for _, fn in c.reads} == {"cpu", "numpy"}
    assert sum(c.foreign.values()) == 1


def test_counter_sees_reads_in_gradient_hooks():
    """The mode is popped while it handles a call, so a backward would hide every hook; the counter
    runs backward with itself active again. Both hook kinds ds_ext uses are covered."""
    p = torch.nn.Parameter(torch.ones(3))

    def after_accumulation(q):  # as the engine's reducer hook
        q.grad.sum().item()

    def on_gradient(g):  # as D-GraB's capture hook (returns None: the gradient is left unchanged)
        g.max().item()

    p.register_post_accumulate_grad_hook(after_accumulation)
    p.register_hook(on_gradient)
    with W.HostReadCounter(prefix=HERE) as c:
        (p * 2).sum().backward()
        torch.autograd.backward([(p * 3).sum()])
    assert c.total == 4, c.reads
    assert torch.equal(p.grad, torch.full((3,), 5.0))  # the backward itself ran normally (2 + 3)
    assert not torch._C._is_torch_function_mode_enabled()


def test_over_budget_is_reported():
    rec = {"reads": Counter({("ds_ext/x.py:1", "item"): 3}), "foreign": Counter(), "shaped": Counter(), "steps": 2,
           "skipped": 0, "error": None}
    ok = dict(rec, reads=Counter({("ds_ext/x.py:1", "item"): 2}))
    assert _over_budget([{"m": rec}]) == ["m (rank 0): 3 reads in 2 steps"]
    assert _over_budget([{"m": ok}]) == []


