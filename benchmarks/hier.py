"""Flat vs hierarchical (node-aware) communication, measured with the real trainer on the emulated cluster
(the body of ``run/bench-hier.sh``; root only there, not a test).

    python -m benchmarks.hier plan --out DIR/plan.json [--parts a,b,c] [--seeds 0,1,2,3,4] ...
    deepspeed --hostfile H --module benchmarks.hier worker --plan DIR/plan.json --out DIR
    python -m benchmarks.hier report DIR [--md DIR/tables.md]

``worker`` (every rank, started by the deepspeed launcher through pdsh/ssh on ``run/cluster.sh up 2 BW
--slots 2``: 2 emulated hosts x 2 ranks) runs every trainer run of the plan one after the other in the
same processes (``ds_ext.trainer.loop.train`` on the recipe with the run's ``--set`` overrides; the process group
and the imports are made once, which saves ~45 s of start-up per run on these 2 cores; the peer watchdog
is off, ``DS_EXT_WATCHDOG=0``, because its address is published once per process group). Around the
trainer, without changing it:

* the communication meter (``ds_ext.meter.CommMeter``) is replaced by a subclass that, at every
  ``end_step`` (after the step's collectives and DeepSpeed's step), records the meter's bytes by kind,
  the wall clock, and this host's interface counters (``/sys/class/net/<GLOO_SOCKET_IFNAME>/statistics``:
  tx/rx bytes and packets; ``lo`` too). Both ranks of a host read the same ``eth0``, which counts only
  what leaves or enters the host (traffic between the two ranks of a host goes over loopback);
* every all_reduce / all_gather of the communication layer (a ``ds_ext.comm.observe`` observer: all of
  ds_ext's traffic passes a ``Communicator``, metered or control) is recorded with its payload and its
  group's ranks, so the bytes that must cross hosts can be computed from the real calls too;
* ``ds_ext.deepspeed.attach.initialize`` is wrapped to keep the engine and its attachment, whose optimizer state is
  measured after the run (part c), with the ranks of ZeRO's data-parallel group(s) and the kind its parameter
  all-gather is metered under. The wrapper only calls the original, so everything ``initialize`` does inside
  stays as it is, in particular ``node_mpu``: a hierarchical reducer under ZeRO 1/2 gets ZeRO's
  data-parallel group = the node (optimizer state partitioned within the node, ZeRO's all-gather metered as
  ``node_zero_allgather`` and staying inside the host).

Window: the counters are differenced between the ends of the first and the last optimizer step of each
epoch and summed over the epochs (so start-up, evaluation and checkpoints, which happen between epochs,
are outside it); the meter's bytes are differenced over exactly the same steps. Expected wire bytes from
the meter (ring arithmetic; gloo's all_reduce and all_gather are rings over the group's ranks in rank
order): a rank sends 2(g-1)/g x payload (all_reduce) or (g-1) x payload (all_gather) to its successor in
the group's ring; that crosses hosts when the successor is on the other host. Flat, 2 hosts x 2 ranks
(ring 0-1-2-3): of the four ring edges 1->2 and 3->0 cross, so a host sends one rank's share and receives
one; hierarchical: the node kinds (``node_mean``, ``node_gather``, and ``node_zero_allgather``: ZeRO 1/2
partitioned within the node) stay in the host, ZeRO's world kinds (``zero_allgather``, ``zero_reduce``) run
over all ranks as flat, every other kind runs in a cross-node group of one rank per host, all of whose edges
cross. Compared with the interface bytes
(tx + rx per host and step), raw and without TCP/IP/Ethernet framing (66 bytes per counted packet: 14
Ethernet + 20 IP + 32 TCP with timestamps; veth counts GSO segments, so this is small).

``report`` reads the raw JSON files and writes the tables (``tables.md``) and ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ds_ext.meter import kind_of

# ---------------------------------------------------------------------------------------------- methods
#: part (a)/(b) methods -> (reducer block, sync block) as YAML flow mappings; ``{H}`` is the hierarchical flag
METHODS: Dict[str, Tuple[str, str]] = {
    "allreduce": ("{{name: allreduce, bucket_mb: 25{H}}}", "{{name: none}}"),
    "powersgd": ("{{name: powersgd, rank: {rank}, start_powerSGD_iter: 0{H}}}", "{{name: none}}"),
    "acpsgd": ("{{name: acpsgd, rank: {acp_rank}{H}}}", "{{name: none}}"),
    "topk": ("{{name: topk, density: {density}{H}}}", "{{name: none}}"),
    "exdyna": ("{{name: exdyna, density: {density}{H}}}", "{{name: none}}"),
    "local_qsr": ("{{name: none}}", "{{name: local, period: qsr, alpha: {qsr_alpha}, h_base: {qsr_h_base}{H}}}"),
}
PART_A = tuple(METHODS)
PART_B = ("powersgd", "topk")
# a metered kind's collective, scope and purpose: ds_ext.meter.KINDS (node kinds run inside a node and never cross
# hosts: hierarchical mode's intra-node steps and ZeRO 1/2's parameter all-gather when ZeRO is partitioned within the
# node, ``node_zero_allgather``; world kinds run over every rank even in hierarchical mode); a method's own kinds:
# the op its recorded collectives name
FRAME_BYTES = 66  # per counted packet: Ethernet 14 + IPv4 20 + TCP 20 + timestamps option 12

DEFAULTS = dict(rank=4, acp_rank=4, density=0.01, qsr_alpha=0.0175, qsr_h_base=4)
#: part (b)'s compression settings (the quickstart model): PowerSGD rank 1 from step 0, top-k 1 %
B_DEFAULTS = dict(DEFAULTS, rank=1)
#: part (a)/(c)'s model: the digits CNN widened (4,291,338 parameters, 17.2 MB of fp32 gradients), so that
#: every method's cross-node payload is large beside gloo's per-message protocol bytes (see the README of the
#: run); the quickstart's own (38,282 parameters) is measured too, as part (b)'s seed-0 runs
A_SETS = ("model.width=64", "model.hidden=2048")


def method_overrides(method: str, hierarchical: bool, **opts) -> List[str]:
    """``--set`` overrides of ``method`` (flat or hierarchical) with the plan's options."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    o = dict(DEFAULTS, **opts)
    red, syn = METHODS[method]
    h = ", hierarchical: true" if hierarchical else ""
    return [f"method.reducer={red.format(H=h, **o)}", f"method.sync={syn.format(H=h, **o)}"]


def run_name(part: str, method: str, mode: str, seed: int, zero: int = 0) -> str:
    return f"{part}-{method}-{mode}-z{zero}-s{seed}"


def build_plan(parts: Sequence[str] = ("a", "b", "c"), seeds: Sequence[int] = (0, 1, 2, 3, 4),
               a_sets: Sequence[str] = A_SETS, a_epochs: Optional[int] = 2, b_epochs: Optional[int] = None,
               recipe: str = "recipes/quickstart.yaml", a_opts: Optional[dict] = None,
               b_opts: Optional[dict] = None) -> dict:
    """The runs of each part. Part (a): every method flat and hierarchical at seed 0 with ``a_sets`` (extra
    overrides: the wider model) for ``a_epochs``; part (b): the quickstart over ``seeds``, flat and
    hierarchical, for powersgd and topk, and flat allreduce (S-SGD) as the reference; part (c): acpsgd flat and
    hierarchical at ZeRO stage 0 and 1 (seed 0, part (a)'s model and length; hierarchical ZeRO 1 is partitioned
    within the node, ``ds_ext.deepspeed.zero.node_mpu``). A run that two parts need with the same settings is run once
    (part (c)'s stage-0 runs are part (a)'s flat and hierarchical acpsgd)."""
    a_opts = dict(DEFAULTS, **(a_opts or {}))
    b_opts = dict(B_DEFAULTS, **(b_opts or {}))
    runs: Dict[str, dict] = {}

    def add(part, method, mode, seed, opts, zero=0, extra=(), epochs=None):
        sets = method_overrides(method, mode == "hier", **opts) + [f"train.seed={seed}",
                                                                      f"deepspeed.zero_optimization.stage={zero}"]
        sets += list(extra)
        if epochs:
            sets.append(f"train.epochs={epochs}")
        for r in runs.values():  # the same settings: one run serves both parts
            if r["sets"] == sets:
                r["parts"] = sorted(set(r["parts"]) | {part})
                return
        name = run_name(part, method, mode, seed, zero)
        runs[name] = {"name": name, "parts": [part], "method": method, "mode": mode, "seed": seed, "zero": zero,
                      "sets": sets}

    if "a" in parts:
        for m in PART_A:
            for mode in ("flat", "hier"):
                add("a", m, mode, 0, a_opts, extra=a_sets, epochs=a_epochs)
    if "c" in parts:
        for mode in ("flat", "hier"):
            for z in (0, 1):
                add("c", "acpsgd", mode, 0, a_opts, zero=z, extra=a_sets, epochs=a_epochs)
    if "b" in parts:
        for s in seeds:
            add("b", "allreduce", "flat", s, b_opts, epochs=b_epochs)
            for m in PART_B:
                for mode in ("flat", "hier"):
                    add("b", m, mode, s, b_opts, epochs=b_epochs)
    return {"kind": "benchmarks.hier.plan", "recipe": recipe, "a_options": a_opts, "b_options": b_opts,
            "a_sets": list(a_sets), "a_epochs": a_epochs, "b_epochs": b_epochs, "seeds": list(seeds),
            "runs": list(runs.values())}


# ------------------------------------------------------------------------------------------- worker
def read_counters(ifname: Optional[str]) -> Optional[List[int]]:
    """[tx_bytes, rx_bytes, tx_packets, rx_packets] of ``ifname`` in this network namespace."""
    if not ifname:
        return None
    base = Path("/sys/class/net") / ifname / "statistics"
    try:
        return [int((base / k).read_text()) for k in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")]
    except OSError:
        return None


class _Recorder:
    """Per-step records of one trainer run on this rank (installed around the trainer by ``worker``)."""

    def __init__(self, ifname: Optional[str]):
        self.ifname = ifname
        self.active = False
        self.steps: List[dict] = []
        self.colls: List[list] = []  # this step's collectives: [op, nbytes, kind, group ranks]
        self.engine = None
        self.attachment = None
        self._members: Dict[int, List[int]] = {}

    def members(self, comm) -> List[int]:
        import torch.distributed as dist

        g = comm.group
        key = id(g)
        if key not in self._members:
            self._members[key] = (list(range(dist.get_world_size())) if g is None
                                  else list(dist.get_process_group_ranks(g)))
        return self._members[key]

    def on_collective(self, comm, op: str, t, kind) -> None:
        if self.active:
            self.colls.append([op, int(t.numel() * t.element_size()), kind, self.members(comm)])

    def on_end_step(self, meter) -> None:
        if not self.active:
            return
        self.steps.append({"step": meter.steps, "t": time.perf_counter(), "by_kind": dict(meter.by_kind),
                           "total": meter.total_bytes, "iface": read_counters(self.ifname),
                           "lo": read_counters("lo"), "colls": self.colls})
        self.colls = []


def _install(rec: _Recorder):
    """Patch the meter class and ``initialize``; observe the communication layer's data collectives
    (``ds_ext.comm.observe``)."""
    from ds_ext.trainer import setup as eng
    from ds_ext import meter
    from ds_ext.comm import observe

    base = meter.CommMeter

    class RecordingMeter(base):
        def end_step(self):
            b = super().end_step()
            rec.on_end_step(self)
            return b

    meter.CommMeter = RecordingMeter

    def observer(comm, op, kind, t, async_op, issue):  # every Communicator's all_reduce / all_gather
        if op != "broadcast":
            rec.on_collective(comm, op, t, kind)
        return issue()

    observe(observer)
    orig_init = eng.initialize

    def initialize(*a, **k):  # only observes: node_mpu etc. run inside the original, unchanged
        out = orig_init(*a, **k)
        rec.engine, rec.attachment = out[0], out[1]
        return out

    eng.initialize = initialize


def _group_ranks(pg) -> List[int]:
    import torch.distributed as dist

    return list(range(dist.get_world_size())) if pg is None else [int(r) for r in dist.get_process_group_ranks(pg)]


def optimizer_memory(engine, attachment=None) -> dict:
    """Bytes of the optimizer's state on this rank: the torch optimizer's state tensors (SGD: momentum), and
    under ZeRO 1/2 also its fp32 master partition (``single_partition_of_fp32_groups``) and the partition
    sizes; the parameters' own bytes for reference. Under ZeRO 1/2 also the ranks of ZeRO's data-parallel
    group (``dp_process_group``, and ``real_dp_process_group`` per parameter group: the node when ZeRO is
    partitioned within it) and, from the attachment's ``ZeroBridge``, whether it is node-partitioned and the
    kind its all-gather is metered under."""
    import torch

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    state = 0
    for st in getattr(inner, "state", {}).values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                state += v.numel() * v.element_size()
    master = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []) or [])
    params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    zero = {}
    if hasattr(opt, "dp_process_group"):
        zero["zero_dp_group_ranks"] = _group_ranks(opt.dp_process_group)
        zero["zero_real_dp_group_ranks"] = [_group_ranks(pg) for pg in getattr(opt, "real_dp_process_group", []) or []]
        zero["zero_partition_count"] = [int(x) for x in getattr(opt, "partition_count", []) or []]
    bridge = getattr(attachment, "zero", None)
    if bridge is not None:
        zero["zero_node_partitioned"] = bool(bridge.node_partitioned)
        zero["zero_allgather_kind"] = bridge.kind
        zero["zero_allgather_bytes"] = int(bridge.allgather_bytes)
    return {"optimizer_state_bytes": state, "fp32_master_bytes": master, "param_bytes": params,
            "partition_numel": [int(x) for x in getattr(opt, "partition_size", []) or []], **zero,
            "optimizer": type(opt).__name__, "inner_optimizer": type(inner).__name__,
            # the process's peak so far: it ran the plan's earlier runs too, so not a per-run number
            "process_max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def worker(args) -> int:
    os.environ.setdefault("DS_EXT_WATCHDOG", "0")
    import torch.distributed as dist

    from ds_ext.trainer import loop as tr
    from ds_ext.comm import barrier
    from ds_ext.comm import init_distributed
    from ds_ext.trainer.recipe import load_recipe, preflight

    plan = json.loads(Path(args.plan).read_text())
    out = Path(args.out).absolute()  # a relative log.dir would be put under the host's log_root
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    rec = _Recorder(ifname)
    _install(rec)
    init_distributed(args.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_size = int(os.environ.get("LOCAL_SIZE", "1"))
    only = set(args.only.split(",")) if args.only else None
    parts = set(args.parts.split(",")) if args.parts else None
    runs = [r for r in plan["runs"] if (only is None or r["name"] in only)
            and (parts is None or parts & set(r["parts"]))]
    for i, run in enumerate(runs):
        rdir = out / "raw" / run["name"]
        log_dir = out / "logs" / run["name"]
        sets = list(run["sets"]) + [f"log.dir={log_dir}", "log.progress=false", "log.wandb.mode=disabled",
                                    "checkpoint.every_epochs=0", "checkpoint.every_steps=0",
                                    f"train.collective_timeout_s={args.timeout_s}"]
        t0 = time.perf_counter()
        code, err = 1, None
        rec.steps, rec.colls, rec.engine, rec.attachment = [], [], None, None
        try:
            recipe = load_recipe(plan["recipe"], sets)
            preflight(recipe, world)
            rec.active = True
            code = tr.train(recipe)
        except Exception as e:  # noqa: BLE001 -- recorded; a recipe error is the same on every rank
            err = f"{type(e).__name__}: {e}"
        finally:
            rec.active = False
        wall = time.perf_counter() - t0
        mem = optimizer_memory(rec.engine, rec.attachment) if rec.engine is not None else None
        summary = None
        if rank == 0 and (log_dir / "summary.json").exists():
            summary = json.loads((log_dir / "summary.json").read_text())
            summary.pop("history", None)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / f"rank{rank}.json").write_text(json.dumps({
            "run": run, "rank": rank, "world": world, "local_size": local_size, "interface": ifname,
            "code": code, "error": err, "wall_s": wall, "memory": mem, "summary": summary,
            "epochs": recipe.train.epochs if err is None else None, "steps": rec.steps}))
        rec.engine = rec.attachment = None
        if rank == 0:
            acc = summary.get("val_acc") if summary else None
            print(f"[bench-hier] run {i + 1}/{len(runs)} {run['name']}: exit {code}"
                  + (f", val acc {acc:.4f}" if acc is not None else "") + f", {wall:.1f} s"
                  + (f" ({err})" if err else ""), flush=True)
        barrier()
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------- analysis
def ring_factor(op: str, g: int) -> float:
    return 2.0 * (g - 1) / g if op == "all_reduce" else float(g - 1)


def crossing(op: str, nbytes: float, members: Sequence[int], rank: int, local_size: int) -> Tuple[float, float]:
    """(bytes this rank sends, bytes it receives) across hosts in a ring collective over ``members`` (rank
    order): it sends to its successor and receives from its predecessor, ``ring_factor`` x payload each."""
    members = sorted(members)
    g = len(members)
    if g < 2 or rank not in members:
        return 0.0, 0.0
    i = members.index(rank)
    f = ring_factor(op, g) * nbytes
    host = rank // local_size
    succ, pred = members[(i + 1) % g], members[(i - 1) % g]
    return (f if succ // local_size != host else 0.0), (f if pred // local_size != host else 0.0)


def _node(kind: str) -> bool:
    return kind_of(kind).scope == "node"


def kind_group(kind: str, rank: int, world: int, local_size: int, hierarchical: bool) -> List[int]:
    """The ranks a metered kind's collective runs over (see the module docstring)."""
    node = rank // local_size
    scope = kind_of(kind).scope
    if scope == "node":
        return list(range(node * local_size, (node + 1) * local_size))
    if hierarchical and scope != "world":
        j = rank % local_size
        return list(range(j, world, local_size))
    return list(range(world))


def windows(steps: List[dict], epochs: int) -> List[Tuple[int, int]]:
    """(first, last) indices into ``steps`` of each epoch's window: from the end of its first optimizer step
    to the end of its last (no evaluation or checkpoint inside). Needs whole epochs of records."""
    n = len(steps)
    if not epochs or n < 2 * epochs or n % epochs:
        return [(0, n - 1)] if n >= 2 else []
    spe = n // epochs
    return [(e * spe, (e + 1) * spe - 1) for e in range(epochs)]


def _delta(a: Optional[list], b: Optional[list]) -> Optional[List[int]]:
    if a is None or b is None:
        return None
    return [y - x for x, y in zip(a, b)]


def analyze_rank(rec: dict, hierarchical: bool) -> dict:
    """Per rank, over its windows: steps, seconds, meter bytes by kind, the expected crossing bytes (from
    the meter and from the recorded collectives) and this host's interface deltas."""
    steps, local, world, rank = rec["steps"], rec["local_size"], rec["world"], rec["rank"]
    wins = windows(steps, rec.get("epochs") or 0)
    out = {"rank": rank, "steps": 0, "seconds": 0.0, "by_kind": {}, "meter_tx": 0.0, "meter_rx": 0.0,
           "coll_tx": 0.0, "coll_rx": 0.0, "control_bytes": 0.0, "iface": [0, 0, 0, 0], "lo": [0, 0, 0, 0],
           "windows": len(wins)}
    for a, b in wins:
        sa, sb = steps[a], steps[b]
        out["steps"] += b - a
        out["seconds"] += sb["t"] - sa["t"]
        for k in set(sa["by_kind"]) | set(sb["by_kind"]):
            d = sb["by_kind"].get(k, 0) - sa["by_kind"].get(k, 0)
            if d:
                out["by_kind"][k] = out["by_kind"].get(k, 0) + d
        for key in ("iface", "lo"):
            d = _delta(sa[key], sb[key])
            if d is None:
                out[key] = None
            elif out[key] is not None:
                out[key] = [x + y for x, y in zip(out[key], d)]
        for s in steps[a + 1:b + 1]:  # the collectives of the steps after the window's start
            for op, nbytes, kind, members in s["colls"]:
                tx, rx = crossing(op, nbytes, members, rank, local)
                out["coll_tx"] += tx
                out["coll_rx"] += rx
                if kind is None:
                    out["control_bytes"] += nbytes
    ops = {kind: op for s in steps for op, _, kind, _ in s["colls"] if kind is not None}
    for k, b in out["by_kind"].items():
        op = ops.get(k) or kind_of(k).op or "all_reduce"
        tx, rx = crossing(op, b, kind_group(k, rank, world, local, hierarchical), rank, local)
        out["meter_tx"] += tx
        out["meter_rx"] += rx
    return out


def analyze_run(ranks: List[dict]) -> dict:
    """One run: per host (the ranks of a host summed; its interface read by its first rank), per step."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    r0 = ranks[0]
    run = r0["run"]
    hier = run["mode"] == "hier"
    local = r0["local_size"]
    per = [analyze_rank(r, hier) for r in ranks]
    res = {"name": run["name"], "parts": run["parts"], "method": run["method"], "mode": run["mode"],
           "seed": run["seed"], "zero": run.get("zero", 0), "world": r0["world"], "local_size": local,
           "code": max(r["code"] for r in ranks), "error": next((r["error"] for r in ranks if r["error"]), None),
           "wall_s": r0["wall_s"], "summary": r0.get("summary"), "memory": [r.get("memory") for r in ranks]}
    s = res["summary"] or {}
    res["val_acc"] = s.get("val_acc")
    steps = per[0]["steps"]
    res["window_steps"] = steps
    if not steps:
        return res
    res["step_ms"] = 1e3 * per[0]["seconds"] / steps
    kinds: Dict[str, float] = {}
    for p in per:
        for k, b in p["by_kind"].items():
            kinds[k] = kinds.get(k, 0.0) + b
    n = len(per)
    res["meter_by_kind_per_rank_step"] = {k: v / n / steps for k, v in sorted(kinds.items())}
    cross_kinds = {k: v for k, v in kinds.items() if not _node(k)}
    res["meter_cross_per_rank_step"] = sum(cross_kinds.values()) / n / steps
    res["meter_node_per_rank_step"] = sum(v for k, v in kinds.items() if _node(k)) / n / steps
    hosts = []
    for h in range(r0["world"] // local):
        hp = [p for p in per if p["rank"] // local == h]
        first = hp[0]
        row = {"host": h + 1,
               "meter_payload": sum(sum(v for k, v in p["by_kind"].items() if not _node(k)) for p in hp) / steps,
               "meter_expected": sum(p["meter_tx"] + p["meter_rx"] for p in hp) / steps,
               "coll_expected": sum(p["coll_tx"] + p["coll_rx"] for p in hp) / steps,
               "control_bytes": sum(p["control_bytes"] for p in hp) / steps}
        if first["iface"] is not None:
            tx, rx, txp, rxp = first["iface"]
            row.update(iface=(tx + rx) / steps, iface_tx=tx / steps, iface_rx=rx / steps,
                       iface_packets=(txp + rxp) / steps,
                       iface_payload=(tx + rx - FRAME_BYTES * (txp + rxp)) / steps)
        if first["lo"] is not None:
            row["lo"] = first["lo"][0] / steps  # loopback: every byte is sent and received on lo
        hosts.append(row)
    res["hosts"] = hosts

    def mean(key):
        vals = [h[key] for h in hosts if key in h]
        return sum(vals) / len(vals) if vals else None

    for key in ("meter_payload", "meter_expected", "coll_expected", "control_bytes", "iface", "iface_payload",
                "iface_packets", "lo"):
        res[key] = mean(key)
    if res.get("iface") is not None and res["meter_expected"]:
        res["ratio_raw"] = res["iface"] / res["meter_expected"]
        res["ratio_payload"] = res["iface_payload"] / res["meter_expected"]
        res["ratio_coll"] = res["iface_payload"] / res["coll_expected"] if res["coll_expected"] else None
    return res


def load_raw(out: Path) -> List[dict]:
    runs = []
    for d in sorted((out / "raw").glob("*")):
        files = sorted(d.glob("rank*.json"))
        if files:
            runs.append(analyze_run([json.loads(f.read_text()) for f in files]))
    return runs


# ------------------------------------------------------------------------------------------- tables
def _kb(x: Optional[float]) -> str:
    return "-" if x is None else f"{x / 1024:,.2f}"


def _f(x: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    xs = list(xs)
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def traffic_rows(runs: List[dict], part: str = "a") -> List[dict]:
    """The runs of a traffic table: part (a)'s, or part (b)'s seed-0 runs (the quickstart model)."""
    rows = [r for r in runs if part in r["parts"] and r.get("window_steps") and r.get("zero", 0) == 0
            and (part != "b" or r["seed"] == 0)]
    order = {m: i for i, m in enumerate(PART_A)}
    rows.sort(key=lambda r: (order.get(r["method"], 99), r["mode"] != "flat"))
    return rows


def traffic_table(runs: List[dict], part: str = "a") -> str:
    """Per method and mode: bytes per optimizer step (KiB) and the interface / meter ratios."""
    rows = traffic_rows(runs, part)
    lines = ["| method | mode | meter cross-node payload / rank | meter payload / host | expected on eth0 (ring) / host "
             "| eth0 tx+rx / host | eth0 tx+rx without framing | **eth0 / expected** (raw; without framing) "
             "| unmetered control / host | node kinds / rank (loopback) | lo bytes / host | step ms (window) |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['mode']} | {_kb(r['meter_cross_per_rank_step'])} | {_kb(r['meter_payload'])} "
                     f"| {_kb(r['meter_expected'])} | {_kb(r.get('iface'))} | {_kb(r.get('iface_payload'))} "
                     f"| **{_f(r.get('ratio_raw'))}**; {_f(r.get('ratio_payload'))} | {_kb(r['control_bytes'])} "
                     f"| {_kb(r['meter_node_per_rank_step'])} | {_kb(r.get('lo'))} | {_f(r.get('step_ms'), '{:.1f}')} |")
    return "\n".join(lines)


def accuracy_rows(runs: List[dict]) -> List[dict]:
    """Part (b): final val accuracy per (method, mode) over the seeds."""
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in runs:
        if "b" in r["parts"] and r.get("val_acc") is not None:
            groups.setdefault((r["method"], r["mode"]), []).append(r)
    out = []
    ref = groups.get(("allreduce", "flat"))
    ref_mean = mean_std([r["val_acc"] for r in ref])[0] if ref else None
    for (m, mode), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "allreduce", kv[0])):
        accs = [r["val_acc"] for r in sorted(rs, key=lambda r: r["seed"])]
        mu, sd = mean_std(accs)
        out.append({"method": m, "mode": mode, "n": len(accs), "mean": mu, "std": sd, "accs": accs,
                    "seeds": [r["seed"] for r in sorted(rs, key=lambda r: r["seed"])],
                    "gap": None if ref_mean is None else mu - ref_mean,
                    "step_ms": statistics.median([r["step_ms"] for r in rs if r.get("step_ms")] or [float("nan")])})
    return out


def accuracy_table(runs: List[dict]) -> str:
    lines = ["| method | mode | seeds | final val acc mean ± std | minus S-SGD | per seed | step ms (median) |",
             "|---|---|---:|---|---:|---|---:|"]
    for r in accuracy_rows(runs):
        gap = "-" if r["gap"] is None else f"{100 * r['gap']:+.2f} pt"
        lines.append(f"| {r['method']} | {r['mode']} | {r['n']} | {r['mean']:.4f} ± {r['std']:.4f} | {gap} | "
                     + ", ".join(f"{a:.4f}" for a in r["accs"]) + f" | {r['step_ms']:.1f} |")
    return "\n".join(lines)


def _groups_text(groups: Sequence[Sequence[int]]) -> str:
    """Distinct rank groups, e.g. ``{0,1} {2,3}``."""
    return " ".join("{" + ",".join(str(r) for r in g) + "}" for g in sorted({tuple(g) for g in groups}))


def zero_rows(runs: List[dict]) -> List[dict]:
    """Part (c): per (mode, ZeRO stage), the optimizer state per rank (the engine's tensors after the run),
    ZeRO's data-parallel group(s), the step time and the traffic; the ratios against the same mode's stage 0."""
    runs = [r for r in runs if "c" in r["parts"] and any(r.get("memory") or [])]
    runs.sort(key=lambda r: (r["mode"] != "flat", r["zero"]))
    base = {r["mode"]: r for r in runs if r["zero"] == 0}
    out = []
    for r in runs:
        mem = [m for m in r["memory"] if m]
        st = [m["optimizer_state_bytes"] for m in mem]
        ma = [m["fp32_master_bytes"] for m in mem]
        kinds = r.get("meter_by_kind_per_rank_step") or {}
        zkinds = sorted(k for k in kinds if kind_of(k).purpose == "ZeRO all-gather")
        groups = [m["zero_dp_group_ranks"] for m in mem if m.get("zero_dp_group_ranks")]
        real = [g for m in mem for g in m.get("zero_real_dp_group_ranks") or []]
        row = {"name": r["name"], "mode": r["mode"], "zero": r["zero"], "ranks": len(mem),
               "state": st, "master": ma, "both": [a + b for a, b in zip(st, ma)], "param_bytes": mem[0]["param_bytes"],
               "partition_numel": mem[0]["partition_numel"], "zero_groups": sorted({tuple(g) for g in groups}),
               "zero_real_groups": sorted({tuple(g) for g in real}),
               "node_partitioned": sorted({m.get("zero_node_partitioned") for m in mem if "zero_node_partitioned" in m}),
               "zero_allgather_kinds": zkinds, "zero_allgather": sum(kinds.get(k, 0.0) for k in zkinds),
               "acpsgd": sum(v for k, v in kinds.items() if k.startswith("acpsgd")),
               "node": r.get("meter_node_per_rank_step"), "step_ms": r.get("step_ms"), "iface": r.get("iface"),
               "expected": r.get("meter_expected"), "ratio_raw": r.get("ratio_raw"),
               "ratio_payload": r.get("ratio_payload"), "val_acc": r.get("val_acc")}
        z0 = base.get(r["mode"])
        if z0 is not None:
            s0 = [m["optimizer_state_bytes"] for m in z0["memory"] if m]
            row["state_vs_z0"] = max(st) / max(s0) if s0 and max(s0) else None
            row["both_vs_z0"] = max(row["both"]) / max(s0) if s0 and max(s0) else None
            if r.get("iface") is not None and z0.get("iface") is not None:
                row["iface_minus_z0"] = r["iface"] - z0["iface"]
            if r.get("meter_expected") is not None and z0.get("meter_expected") is not None:
                row["expected_minus_z0"] = r["meter_expected"] - z0["meter_expected"]
        out.append(row)
    return out


def zero_table(runs: List[dict]) -> str:
    """Part (c): one line per (mode, ZeRO stage); see ``zero_rows``."""
    lines = ["| mode | ZeRO | ZeRO group (ranks) | optimizer state / rank (SGD momentum) | / ZeRO-0's | fp32 master "
             "partition / rank | state + master | / ZeRO-0's state | ZeRO partition (elements) | step ms (window) "
             "| ZeRO all-gather / rank·step (kind) | acpsgd payload / rank·step | eth0 tx+rx / host·step "
             "| minus ZeRO-0's | expected on eth0 / host·step | eth0 / expected (raw; without framing) | val acc |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]

    def rng(xs):
        return f"{_kb(min(xs))} KiB" if min(xs) == max(xs) else f"{_kb(min(xs))}-{_kb(max(xs))} KiB"

    def signed(x):
        return "-" if x is None else f"{'+' if x >= 0 else '-'}{_kb(abs(x))} KiB"

    for r in zero_rows(runs):
        groups = _groups_text(r["zero_groups"]) if r["zero"] else "-"
        kind = f" ({', '.join(r['zero_allgather_kinds'])})" if r["zero_allgather_kinds"] else ""
        lines.append(f"| {r['mode']} | {r['zero']} | {groups} | {rng(r['state'])} | {_f(r.get('state_vs_z0'))} | "
                     f"{rng(r['master'])} | {rng(r['both'])} | {_f(r.get('both_vs_z0'))} | "
                     f"{r['partition_numel'] or '-'} | {_f(r['step_ms'], '{:.1f}')} | {_kb(r['zero_allgather'])} KiB{kind} "
                     f"| {_kb(r['acpsgd'])} KiB | {_kb(r['iface'])} KiB | {signed(r.get('iface_minus_z0'))} "
                     f"| {_kb(r['expected'])} KiB | {_f(r['ratio_raw'])}; {_f(r['ratio_payload'])} "
                     f"| {_f(r['val_acc'], '{:.4f}')} |")
    return "\n".join(lines)


def comparison_rows(runs: List[dict], part: str = "a") -> List[dict]:
    """Per method: hierarchical over flat, for the eth0 bytes per host and step and for the step time."""
    by = {(r["method"], r["mode"]): r for r in traffic_rows(runs, part)}
    out = []
    for m in PART_A:
        f, h = by.get((m, "flat")), by.get((m, "hier"))
        if not f or not h:
            continue
        row = {"method": m, "flat_eth0": f.get("iface"), "hier_eth0": h.get("iface"),
               "flat_expected": f.get("meter_expected"), "hier_expected": h.get("meter_expected"),
               "flat_step_ms": f.get("step_ms"), "hier_step_ms": h.get("step_ms")}
        if row["flat_eth0"] and row["hier_eth0"]:
            row["eth0_ratio"] = row["hier_eth0"] / row["flat_eth0"]
        if row["flat_step_ms"] and row["hier_step_ms"]:
            row["step_ratio"] = row["hier_step_ms"] / row["flat_step_ms"]
        out.append(row)
    return out


def comparison_table(runs: List[dict], part: str = "a") -> str:
    lines = ["| method | eth0 KiB/step/host flat | hierarchical | **hier / flat** | expected from the meter: flat | "
             "hierarchical | step ms flat | hierarchical | hier / flat |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in comparison_rows(runs, part):
        lines.append(f"| {r['method']} | {_kb(r['flat_eth0'])} | {_kb(r['hier_eth0'])} | **{_f(r.get('eth0_ratio'))}** | "
                     f"{_kb(r['flat_expected'])} | {_kb(r['hier_expected'])} | {_f(r['flat_step_ms'], '{:.1f}')} | "
                     f"{_f(r['hier_step_ms'], '{:.1f}')} | {_f(r.get('step_ratio'))} |")
    return "\n".join(lines)


def paired_rows(runs: List[dict]) -> List[dict]:
    """Part (b): hierarchical minus flat final accuracy, paired by seed (same initialisation and data order)."""
    acc = {(r["method"], r["mode"], r["seed"]): r["val_acc"] for r in runs
           if "b" in r["parts"] and r.get("val_acc") is not None}
    out = []
    for m in PART_B:
        seeds = sorted(s for (mm, mode, s) in acc if mm == m and mode == "flat" and (m, "hier", s) in acc)
        if not seeds:
            continue
        d = [acc[(m, "hier", s)] - acc[(m, "flat", s)] for s in seeds]
        mu, sd = mean_std(d)
        se = sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out.append({"method": m, "n": len(d), "diffs": d, "mean": mu, "std": sd, "se": se,
                    "t": mu / se if se and se == se and se > 0 else float("nan"),
                    "hier_better": sum(x > 0 for x in d), "equal": sum(x == 0 for x in d),
                    "flat_better": sum(x < 0 for x in d)})
    return out


def paired_table(runs: List[dict]) -> str:
    lines = ["| method | seeds | hier - flat per seed (pt) | mean ± std (pt) | t (paired) | hier better / equal / worse |",
             "|---|---:|---|---|---:|---|"]
    for r in paired_rows(runs):
        lines.append(f"| {r['method']} | {r['n']} | " + ", ".join(f"{100 * x:+.2f}" for x in r["diffs"])
                     + f" | {100 * r['mean']:+.2f} ± {100 * r['std']:.2f} | {_f(r['t'], '{:.2f}')} | "
                     f"{r['hier_better']} / {r['equal']} / {r['flat_better']} |")
    return "\n".join(lines)


def tables_markdown(runs: List[dict], meta: Optional[dict] = None) -> str:
    meta = meta or {}
    plan = meta.get("plan") or {}
    a_opts, b_opts = plan.get("a_options") or DEFAULTS, plan.get("b_options") or B_DEFAULTS
    a_sets = " ".join(plan.get("a_sets") or A_SETS)
    parts = [f"# bench-hier: flat vs hierarchical, {meta.get('hosts', 2)} emulated hosts x {meta.get('slots', 2)} "
             f"ranks, links {meta.get('bandwidth', '?')}", ""]
    if meta.get("command"):
        parts += [f"Command: `{meta['command']}`; wall time {meta.get('wall_s', 0) / 60:.1f} min "
                  f"({meta.get('started', '?')} - {meta.get('finished', '?')}).", ""]
    parts += ["4 ranks share this machine's 2 CPU cores: every step time here is CPU-contended (compute, compression "
              "and gloo's copies of the 4 ranks compete), not a property of the network alone.", ""]
    ran = {p for r in runs for p in r["parts"]}  # only the parts that ran (run/bench-hier.sh --parts)
    ab = [f"## (a) traffic per optimizer step: digits CNN widened ({a_sets}: 4,291,338 parameters), "
          f"{plan.get('a_epochs') or 8} epochs, seed 0",
          "",
          f"Methods: allreduce (25 MiB buckets), powersgd rank {a_opts['rank']} (from step 0), acpsgd rank "
          f"{a_opts['acp_rank']}, topk and exdyna density {a_opts['density']}, local_qsr (reducer none, Local SGD "
          f"with the QSR period, alpha {a_opts['qsr_alpha']}, h_base {a_opts['qsr_h_base']}). KiB per optimizer "
          "step, over every epoch's window (end of its first step to end of its last). Per-host numbers: the mean "
          "of the 2 hosts. 'meter cross-node payload / rank': the meter's kinds except node_mean / node_gather; "
          "'expected on eth0': that payload through gloo's rings (flat: one ring edge per host crosses, "
          "2(g-1)/g or g-1 x the payload of one rank each way; hierarchical: every edge of the cross-node groups "
          "crosses), tx + rx. 'without framing': eth0 bytes minus 66 bytes per counted packet.", "",
          traffic_table(runs, "a"), "",
          "Hierarchical over flat (same runs):", "", comparison_table(runs, "a"), "",
          f"### (a') the same on the quickstart model itself (38,282 parameters; part (b)'s seed-0 runs: powersgd "
          f"rank {b_opts['rank']}, topk density {b_opts['density']})", "",
          traffic_table(runs, "b"), "",
          f"## (b) accuracy: digits quickstart ({plan.get('b_epochs') or 8} epochs), final val accuracy "
          f"(359 images), seeds {', '.join(str(s) for s in plan.get('seeds') or [])}", "",
          f"powersgd rank {b_opts['rank']} (start_powerSGD_iter 0), topk density {b_opts['density']}; S-SGD = "
          "allreduce, flat.", "", accuracy_table(runs), "",
          "Paired by seed (hierarchical minus flat; same initialisation and data order):", "", paired_table(runs), ""]
    c = [f"## (c) ZeRO-1 vs ZeRO-0, acpsgd rank {a_opts['acp_rank']}, flat and hierarchical (part (a)'s "
         "model and length)", "",
         "Flat ZeRO 1 partitions the optimizer state over all 4 ranks and all-gathers the updated parameters "
         "over all of them (kind zero_allgather, crossing hosts); hierarchical ZeRO 1 (ds_ext.deepspeed.zero.node_mpu) "
         "partitions it within the node (ZeRO group = the host's 2 ranks, one copy per host) and all-gathers "
         "inside the host (kind node_zero_allgather, excluded from the expected eth0 bytes). 'ZeRO group': the "
         "ranks of the ZeRO optimizer's dp_process_group as recorded on every rank after the run. Optimizer "
         "state and master partition: the engine's tensors after the run, per rank (SGD momentum; fp32 master "
         "partition only under ZeRO). Step times are CPU-contended (see above).", "",
         zero_table(runs), ""]
    if "a" in ran or "b" in ran:
        parts += ab
    if "c" in ran:
        parts += c
    failed = [r for r in runs if r["code"] != 0 or r["error"]]
    if failed:
        parts += ["## failed runs", ""] + [f"* {r['name']}: exit {r['code']} {r['error'] or ''}" for r in failed] + [""]
    if meta.get("projection"):
        parts += ["## cost model: flat vs hierarchical projection (`python -m ds_ext.costmodel --hierarchical`)", "",
                  "```", meta["projection"].rstrip(), "```", ""]
    return "\n".join(parts)


def report(args) -> int:
    out = Path(args.out)
    runs = load_raw(out)
    if not runs:
        print(f"no raw results under {out / 'raw'}", file=sys.stderr)
        return 1
    meta = json.loads(Path(args.meta).read_text()) if args.meta and Path(args.meta).exists() else {}
    if args.projection and Path(args.projection).exists():
        meta["projection"] = Path(args.projection).read_text()
    md = tables_markdown(runs, meta)
    Path(args.md or out / "tables.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "accuracy": accuracy_rows(runs),
                                                   "paired": paired_rows(runs), "comparison": comparison_rows(runs),
                                                   "zero": zero_rows(runs)},
                                                  indent=1))
    print(md)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hier", description=__doc__.split("\n\n")[0])
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="write the plan of trainer runs")
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--seeds", default="0,1,2,3,4", help="part (b)'s seeds")
    p.add_argument("--a-set", action="append", default=None,
                   help=f"override of part (a)/(c) runs (repeatable; default: {' '.join(A_SETS)})")
    p.add_argument("--a-epochs", type=int, default=2, help="epochs of part (a)/(c) runs (0: the recipe's)")
    p.add_argument("--b-epochs", type=int, default=0, help="epochs of part (b) runs (0: the recipe's, 8)")
    p.add_argument("--a-rank", type=int, default=DEFAULTS["rank"], help="part (a): powersgd rank")
    p.add_argument("--a-acp-rank", type=int, default=DEFAULTS["acp_rank"], help="part (a)/(c): acpsgd rank")
    p.add_argument("--a-density", type=float, default=DEFAULTS["density"], help="part (a): topk / exdyna density")
    p.add_argument("--b-rank", type=int, default=B_DEFAULTS["rank"], help="part (b): powersgd rank")
    p.add_argument("--b-density", type=float, default=B_DEFAULTS["density"], help="part (b): topk density")
    w = sub.add_parser("worker", help="every rank, under the deepspeed launcher: run the plan")
    w.add_argument("--plan", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--only", default=None, help="comma list of run names")
    w.add_argument("--parts", default=None, help="only the runs of these parts (comma list)")
    w.add_argument("--timeout-s", type=float, default=300.0)
    w.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    r = sub.add_parser("report", help="tables from the raw results")
    r.add_argument("out")
    r.add_argument("--md", default=None)
    r.add_argument("--meta", default=None, help="meta JSON written by run/bench-hier.sh (command, times, plan)")
    r.add_argument("--projection", default=None, help="text of the cost model's --hierarchical projection")
    args = ap.parse_args(argv)
    if args.cmd == "plan":
        plan = build_plan([x for x in args.parts.split(",") if x], [int(x) for x in args.seeds.split(",") if x],
                          a_sets=A_SETS if args.a_set is None else args.a_set, a_epochs=args.a_epochs or None,
                          b_epochs=args.b_epochs or None,
                          a_opts=dict(rank=args.a_rank, acp_rank=args.a_acp_rank, density=args.a_density),
                          b_opts=dict(rank=args.b_rank, density=args.b_density))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(plan, indent=1))
        print(f"{len(plan['runs'])} runs -> {args.out}")
        return 0
    if args.cmd == "worker":
        return worker(args)
    return report(args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as ds_ext.trainer.loop: no interpreter teardown of gloo threads
