"""Issues 14 and 27: at most ONE host synchronisation per optimizer step in ds_ext's own code (two for ``topk``
with ``exchange: union``, named in ``workers_syncs.BUDGETS``), in steady state, for every reducer, sync, order,
ZeRO stage and hierarchical mode, through ``attach`` with the trainer's stop vote on, and through the trainer.

The syncs are counted by ``tests.dist.sync_counter.SyncCounter`` (a ``TorchFunctionMode``; see its docstring:
host reads, blocking host-to-device copies such as ``torch.tensor(host list, device=)``, data-dependent shapes
such as ``unique``). On CPU it counts the calls that would block the host on CUDA; on a GPU
``torch.cuda.set_sync_debug_mode`` counts the real ones (the GPU check). Every scenario
(``tests/dist/workers_syncs.py``) gets a fresh engine inside one pooled 2-rank call or one pooled 4-rank call
(DS-Sync with real subgroups, hierarchical mode as 2 nodes x 2), ``nonfinite="skip"`` (the default), the stop
vote on, no consistency check; the counter is active around steady-state steps only (after 2 warm-up steps).
``ds_ext.ops`` runs its torch code (``DS_EXT_OPS=torch``), whose syncs are visible in Python. Syncs outside
ds_ext's frames (DeepSpeed's gradient-norm check under ZeRO) are listed apart, not in the budget. A negative
control in the 2-rank call (the consistency check every step, which digests every parameter on the host) must be
counted far over the budget, in ds_ext.

Run with ``-s`` to see the table (it is also in the assertion message).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from tests import harness
from tests.dist import workers_syncs as W
from tests.dist.sync_counter import SyncCounter


def _merge(recs, key) -> dict:
    """(site, what) -> the largest count over the ranks."""
    out = {}
    for r in recs:
        for k, n in r[key].items():
            out[k] = max(out.get(k, 0), n)
    return out


def _sites(merged: dict, tag: str = "") -> list:
    return [f"      {tag}{site}: {what} x{n}" for (site, what), n in sorted(merged.items())]


def _table(results, title: str) -> str:
    """One row per scenario: the worst rank's syncs per step in ds_ext, its budget, the syncs per step outside
    ds_ext's frames (DeepSpeed's: not in the budget); under it every site (``file:line function <- caller``,
    what x count over the measured steps, all ranks' sites merged), those outside ds_ext marked."""
    lines = [title, f"{'scenario':<40} {'syncs/step':>10} {'budget':>6} {'others/step':>11}"]
    for name in results[0]:
        recs = [r[name] for r in results]
        err = next((r["error"] for r in recs if r["error"]), None)
        if err:
            lines.append(f"{name:<40} {'ERROR':>10} {W.budget(name):>6}  {err.splitlines()[0]}")
            continue
        per_step = max(sum(r["syncs"].values()) / max(r["steps"], 1) for r in recs)
        others = max(sum(r["foreign"].values()) / max(r["steps"], 1) for r in recs)
        flag = "  OVER" if per_step > W.budget(name) else ""
        lines.append(f"{name:<40} {per_step:>10.2f} {W.budget(name):>6} {others:>11.2f}   "
                     f"({recs[0]['steps']} steps){flag}")
        lines += _sites(_merge(recs, "syncs")) + _sites(_merge(recs, "foreign"), "[not ds_ext] ")
    return "\n".join(lines)


def _over_budget(results, skip=()) -> list:
    bad = []
    for name in results[0]:
        if name in skip:
            continue
        for rank, r in enumerate(results):
            rec, allowed = r[name], W.budget(name)
            n = sum(rec["syncs"].values())
            if rec["error"]:
                bad.append(f"{name} (rank {rank}): {rec['error']}")
            elif rec["skipped"]:  # a skipped step is not the steady-state path
                bad.append(f"{name} (rank {rank}): {rec['skipped']} step(s) skipped for non-finite gradients")
            elif rec["steps"] == 0 or n > allowed * rec["steps"]:
                sites = ", ".join(f"{s} {w} x{c}" for (s, w), c in sorted(rec["syncs"].items()))
                bad.append(f"{name} (rank {rank}): {n} syncs in {rec['steps']} steps (budget {allowed}/step): {sites}")
    return bad


def _check(results, title: str, skip=()) -> str:
    table = _table(results, title)
    print("\n" + table)
    bad = _over_budget(results, skip=skip)
    assert not bad, "over the budget of host synchronisations per step:\n" + "\n".join(bad) + "\n\n" + table
    return table


TITLE = "host synchronisations per optimizer step in ds_ext's frames ({}, gloo, DS_EXT_OPS=torch, stop vote on)"


def test_one_sync_per_step_two_ranks():
    """Every reducer, sync and order (tests/roster.py), allreduce in 4 buckets, both top-k exchanges, ZeRO 1 and
    2 under four reducers, and the negative control, in one pooled 2-rank call."""
    results = harness.run_pooled(W.measure, 2, scenarios=W.scenarios_two_ranks(), timeout=400)
    table = _table(results, TITLE.format("2 ranks"))
    # the negative control reads the host for every parameter: the counter must see it, in ds_ext
    ctl = results[0][W.CONTROL]
    assert ctl["error"] is None, ctl["error"]
    assert sum(ctl["syncs"].values()) > 2 * ctl["steps"], table
    assert any(site.startswith("ds_ext/deepspeed/step_hooks.py") and what in ("cpu", "numpy")
               for site, what in ctl["syncs"]), table
    _check(results, TITLE.format("2 ranks"), skip={W.CONTROL})


def test_one_sync_per_step_four_ranks():
    """DS-Sync with 2 groups (real subgroups: groups must divide the world), hierarchical mode as 2 nodes x 2 for
    every reducer it wraps, hierarchical Local SGD, hierarchical ZeRO-1 within the node (``node_mpu``), in one
    pooled 4-rank call."""
    results = harness.run_pooled(W.measure, 4, scenarios=W.scenarios_four_ranks(), timeout=400)
    _check(results, TITLE.format("4 ranks: 2 nodes x 2"))


def test_one_sync_per_step_through_the_trainer(tmp_path):
    """The trainer's own loop (quickstart recipe, its stop vote, no logging step among the counted ones), in
    fresh ranks (the trainer ends its process group)."""
    results = harness.run(W.trainer_run, 2, argv=W.trainer_argv(str(tmp_path)), timeout=300)
    _check(results, TITLE.format("2 ranks, ds_ext.trainer"))


def test_hierarchical_mode_runs_every_reducer_it_wraps():
    """(The registered reducers, syncs and orders on 2 ranks: tests/unit/test_roster.py.)"""
    from ds_ext.hierarchy import wrappable_reducers

    hier = {W.covers(s)["reducer"] for s in W.scenarios_four_ranks().values() if s.get("nodes")}
    assert set(wrappable_reducers()) <= hier


# ------------------------------------------------------------------ the counter itself (in-process)
HERE = str(Path(__file__).resolve().parent) + os.sep  # a prefix that makes this file count as "ours"


def _what(c) -> Counter:
    return Counter(what for (_, what), n in c.syncs.items() for _ in range(n))


def test_counter_sees_every_read_function():
    x = torch.tensor([0.5, -1.0, 2.0])  # made before the counter: device data to it
    with SyncCounter(prefix=HERE) as c:
        x[0].item()
        x.tolist()
        bool(x[0] > 0)
        int(x[2])
        float(x[0])
        [1, 2, 3][torch.tensor(1, device=torch.device("cpu"))]  # __index__
        x.cpu()
        x.numpy()
        x.nonzero()
        torch.nonzero(x)
        if x[1] < 0:  # an implicit __bool__
            pass
        torch.equal(x, x)
        f"{x[0]}"
        x.to("cpu")
    got = _what(c)
    assert got == Counter({"item": 1, "tolist": 1, "__bool__": 2, "__int__": 1, "__float__": 1, "__index__": 1,
                           "cpu": 1, "numpy": 1, "nonzero": 2, "equal": 1, "__format__": 1, "to(cpu)": 1,
                           "tensor(host data)": 1}), got
    assert all(site.startswith("tests/dist/test_syncs.py:") for site, _ in c.syncs), c.syncs
    assert not c.foreign


def test_counter_sees_host_to_device_copies_and_spares_the_host():
    """``torch.tensor(python data, device=<a torch.device>)`` is a pageable copy that blocks on CUDA; a copy from
    a host tensor to the device blocks unless ``non_blocking``; reads of host tensors wait for nothing."""
    dev = torch.device("cpu")  # ds_ext's spelling of its device: comm.device, a torch.device
    with SyncCounter(prefix=HERE) as c:
        torch.tensor([0, 1], dtype=torch.int64, device=dev)  # counted: host list -> device
        torch.as_tensor(3.0, device=dev)  # counted
        host = torch.tensor([1.0, 2.0])  # host bookkeeping (no device): not counted
        host.sum().item()  # a read of host data: not counted
        torch.tensor([1], device="cpu").tolist()  # "cpu" spelled out: host placement, not counted
        on_dev = host.to(dev)  # counted: a blocking host-to-device copy
        host.to(dev, non_blocking=True)  # not counted
        torch.zeros(2, device=dev).copy_(torch.ones(2))  # counted: copy_ from a host tensor
        on_dev.sum().item()  # counted: host.to(dev) is device data now
        torch.zeros(3, device=dev).new_tensor([1, 2, 3])  # counted
        torch.zeros(2).copy_(on_dev)  # counted: a copy into host memory reads the device
        torch.tensor([on_dev[0], on_dev[1]])  # counted: host data made of device scalars reads them
        torch.as_tensor(on_dev)  # not counted: stays on the device
    assert _what(c) == Counter({"tensor(host data)": 1, "as_tensor(host data)": 1, "to(blocking H2D)": 1,
                                "copy_(blocking H2D)": 1, "item": 1, "new_tensor(host data)": 1, "copy_(D2H)": 1,
                                "tensor(device data)": 1}), c.syncs
    # outside the prefix "cpu" is the device: DeepSpeed names the CPU accelerator's device so (cuda:0 on a GPU)
    with SyncCounter(prefix="/nonexistent/") as other:
        torch.zeros(2, device="cpu").sum().item()
        torch.ones(2, device="cpu").to("cpu").sum()
    assert Counter(what for (_, what) in other.foreign.elements()) == Counter({"item": 1}), other.foreign


def test_counter_counts_data_dependent_shapes():
    x = torch.tensor([0.5, -1.0, 2.0, 2.0], device=torch.device("cpu"))
    with SyncCounter(prefix=HERE) as c:
        mask = x > 0
        torch.unique(x)
        x.unique_consecutive()
        torch.masked_select(x, mask)
        x[mask]
        x[mask] = 0.0
        torch.where(mask)
        torch.where(mask, x, 0.0)  # three arguments: a fixed shape, not counted
        torch.argwhere(x)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1], device=torch.device("cpu")))
        x.repeat_interleave(2)  # a Python repeat: not counted
        torch.tensor([1.0, 1.0]).unique()  # host data: not counted
    assert _what(c) == Counter({"unique": 1, "unique_consecutive": 1, "masked_select": 1, "getitem[bool mask]": 1,
                                "setitem[bool mask]": 1, "where(cond)": 1, "argwhere": 1, "repeat_interleave": 1,
                                "tensor(host data)": 1}), c.syncs


def test_counter_attributes_syncs_to_the_nearest_frame_outside_torch():
    """A read made inside torch on behalf of a caller belongs to the caller: ``clip_grad_norm_(...,
    error_if_nonfinite=True)`` tests its norm with ``__bool__`` in torch/nn/utils/clip_grad.py. Syncs
    outside the prefix are kept apart (``foreign``)."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with SyncCounter(prefix=HERE) as ours:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    (site, what), = ours.syncs
    assert what == "__bool__" and site.startswith("tests/dist/test_syncs.py:"), ours.syncs
    assert "test_counter_attributes_syncs_to_the_nearest_frame_outside_torch" in site
    with SyncCounter(prefix="/nonexistent/") as other:
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert not other.syncs
    (site2, what2), = other.foreign
    assert what2 == "__bool__" and site2.startswith("tests/dist/test_syncs.py:"), other.foreign


def test_counter_counts_syncs_in_ds_ext_frames_and_names_the_caller():
    """``parameter_fingerprint`` reads every parameter on the host (``.cpu()``; its ``.numpy()`` is of host
    data then); ``Communicator.tensor`` of a host list is a host-to-device copy, charged to comm.py and naming
    its caller. This file is not ds_ext: its syncs are foreign."""
    from ds_ext.comm import Communicator
    from ds_ext.deepspeed.step_hooks import parameter_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 4 parameters
    comm = Communicator(device="cpu")
    with SyncCounter() as c:
        parameter_fingerprint(model)
        torch.ones(2, device=torch.device("cpu")).sum().item()  # this file is not ds_ext: not counted as ours
    assert c.total == 4, c.syncs
    (site, what), = c.syncs
    assert site.startswith("ds_ext/deepspeed/step_hooks.py:") and "parameter_fingerprint" in site and what == "cpu"
    assert sum(c.foreign.values()) == 1
    with SyncCounter(prefix=HERE) as via:
        comm.tensor([1], dtype=torch.int64)
    assert not via.syncs  # comm.py is not under this prefix ...
    (site, what), = via.foreign  # ... and the caller is named after it
    assert site.startswith("ds_ext/comm.py:") and "Communicator.tensor <- tests/dist/test_syncs.py:" in site, site
    assert what == "tensor(host data)"


def test_counter_sees_syncs_in_gradient_hooks():
    """The mode is popped while it handles a call, so a backward would hide every hook; the counter
    runs backward with itself active again. Both hook kinds ds_ext uses are covered."""
    p = torch.nn.Parameter(torch.ones(3))

    def after_accumulation(q):  # as the engine's reducer hook
        q.grad.sum().item()

    def on_gradient(g):  # as D-GraB's capture hook (returns None: the gradient is left unchanged)
        g.max().item()

    p.register_post_accumulate_grad_hook(after_accumulation)
    p.register_hook(on_gradient)
    with SyncCounter(prefix=HERE) as c:
        (p * 2).sum().backward()
        torch.autograd.backward([(p * 3).sum()])
    assert c.total == 4, c.syncs
    assert torch.equal(p.grad, torch.full((3,), 5.0))  # the backward itself ran normally (2 + 3)
    assert not torch._C._is_torch_function_mode_enabled()


def test_over_budget_is_reported():
    rec = {"syncs": Counter({("ds_ext/x.py:1 f", "item"): 3}), "foreign": Counter(), "steps": 2, "skipped": 0,
           "error": None}
    ok = dict(rec, syncs=Counter({("ds_ext/x.py:1 f", "item"): 2}))
    assert _over_budget([{"m": rec}]) == ["m (rank 0): 3 syncs in 2 steps (budget 1/step): ds_ext/x.py:1 f item x3"]
    assert _over_budget([{"m": ok}]) == []
    union = dict(rec, syncs=Counter({("ds_ext/x.py:1 f", "item"): 4}))
    assert _over_budget([{W.UNION: union}]) == []  # its named budget is 2
