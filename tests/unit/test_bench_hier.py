"""The cost model's two-level (hierarchical) term and the flat-vs-hierarchical bench driver's bookkeeping.

Fast (no root, no cluster, no process group): the two-level term against ``ds_ext.hierarchy``'s own traffic
description, the intra-node pricing by hand, the network term of a compressing method at 8 GPUs per node,
the CLI's ``--hierarchical`` table; the bench driver's plan, ring arithmetic, step windows and tables on a
synthetic result (the cluster measurement itself is ``run/bench-hier.sh``, root only)."""
import math

import pytest

from ds_ext.costmodel import model as cm
from benchmarks import hier as bh
from ds_ext.comm import Collective
from ds_ext.hierarchy import HierarchicalAveraging, NodeCollective, hierarchical_collectives
from ds_ext.registry import REDUCERS, SYNCS, load_builtin

SHAPES = [(32, 16, 3, 3), (32,), (64, 512), (64,), (10, 64), (10,)]   # a small CNN-like parameter list
OPTS = cm.MethodOptions(rank=2, density=0.01)


def _inner_collectives(method, n, g, local_rank=None):
    """``ds_ext.hierarchy``'s own description of a hierarchical step (not through the cost model)."""
    load_builtin()
    rname, ropts, sname, sopts = cm.method_specs(OPTS)[method]
    if rname != "none":
        e = REDUCERS.get(rname)
        return hierarchical_collectives(e.factory, SHAPES, n, g, e.options(**ropts), local_rank=local_rank,
                                        lr=OPTS.qsr_lr)
    e = SYNCS.get(sname)
    return HierarchicalAveraging.collectives(SHAPES, n, g, e.options(**sopts), lr=OPTS.qsr_lr, local_rank=local_rank)


def _payload(colls, intra):
    return sum(c.nbytes * c.calls for c in colls if bool(getattr(c, "intra_node", False)) == intra)


# ------------------------------------------------------------------------------------ cost model
@pytest.mark.parametrize("method", ["allreduce", "powersgd", "acpsgd", "topk", "exdyna", "local_qsr"])
def test_two_level_cross_bytes_are_hierarchical_collectives_non_node_bytes(method):
    c = cm.Constants(alpha_s=1e-4, eta=0.9)
    for n, g in ((16, 8), (32, 8), (4, 2)):
        h = cm.hierarchical_comm(method, SHAPES, n, g, OPTS, c, 10e9)
        assert h["cross_bytes"] == _payload(_inner_collectives(method, n, g), intra=False)
        assert h["intra_bytes"] == _payload(_inner_collectives(method, n, g), intra=True) > 0
        per = [_inner_collectives(method, n, g, j) for j in range(g)]
        assert h["cross_bytes_node"] == sum(_payload(cs, intra=False) for cs in per)
        wires = [sum(x.calls * x.wire_bytes() for x in cs if not getattr(x, "intra_node", False)) for cs in per]
        assert math.isclose(h["net_bytes_node"], sum(wires))
    # the cost model's method list goes through the same function
    assert cm.hierarchical_method_collectives(method, SHAPES, 16, 8, OPTS) == _inner_collectives(method, 16, 8)


def test_intra_node_collectives_are_priced_at_the_intra_node_rate():
    c = cm.Constants(alpha_s=1e-3, eta=0.5, intra_bw_bits=8e9, intra_alpha_s=1e-6)
    node = NodeCollective("all_reduce", 1e6, 8)
    # 2 (8-1) = 14 hops x 1 us + 2 (7/8) x 1e6 B / 1e9 B/s, whatever the network's rate
    want = 14e-6 + 1.75e6 / 1e9
    for bw in (1e6, 1e9, 1e12):
        assert math.isclose(cm.comm_seconds([node], bw, c), want, rel_tol=1e-12)
    net = Collective("all_reduce", 1e6, 4)  # the same bytes on the network: alpha, eta and the link rate
    assert math.isclose(cm.comm_seconds([node, net], 8e9, c), want + 6e-3 + 1.5e6 / 0.5e9, rel_tol=1e-12)
    # the two-level term: intra-node time is the node collectives at the intra rate, independent of the network
    h1 = cm.hierarchical_comm("powersgd", SHAPES, 16, 8, OPTS, c, 1e9)
    h2 = cm.hierarchical_comm("powersgd", SHAPES, 16, 8, OPTS, c, 100e9)
    nodes = [x for x in _inner_collectives("powersgd", 16, 8) if getattr(x, "intra_node", False)]
    assert len(nodes) == 2 and math.isclose(h1["intra_s"], cm.intra_seconds(nodes, c), rel_tol=1e-12)
    assert h1["intra_s"] == h2["intra_s"] and h1["net_s"] > h2["net_s"]
    faster = cm.Constants(1e-3, 0.5, intra_bw_bits=80e9, intra_alpha_s=1e-6)
    assert cm.hierarchical_comm("powersgd", SHAPES, 16, 8, OPTS, faster, 1e9)["intra_s"] < h1["intra_s"]
    assert math.isclose(h1["comm_s"], h1["net_s"] + h1["intra_s"])


@pytest.mark.parametrize("method", ["powersgd", "topk", "exdyna", "acpsgd"])
def test_hierarchical_network_term_is_cheaper_for_a_compressing_method(method):
    # NCCL's 14 us (the default), the emulation's fitted 1.2 ms, and no latency at all
    for consts in (cm.DEFAULT_CONSTANTS, cm.EMULATION_FIT_CONSTANTS, cm.Constants(0.0, 0.9, intra_alpha_s=0.0)):
        for n in (16, 32, 64):
            f = cm.flat_comm(method, SHAPES, n, 8, OPTS, consts, 10e9)
            h = cm.hierarchical_comm(method, SHAPES, n, 8, OPTS, consts, 10e9)
            assert h["net_s"] < f["net_s"], (method, n, consts.alpha_s)
            assert h["net_bytes_node"] <= f["net_bytes_node"]


def test_flat_term_is_the_flat_model_and_one_node_runs_inside_it():
    c = cm.Constants(alpha_s=2e-4, eta=0.8)
    for m in ("allreduce", "powersgd", "topk", "local_qsr"):
        f = cm.flat_comm(m, SHAPES, 32, 8, OPTS, c, 10e9)
        assert math.isclose(f["comm_s"], cm.comm_seconds(cm.collectives(m, SHAPES, 32, OPTS), 10e9, c), rel_tol=1e-12)
        two = cm.flat_comm(m, SHAPES, 32, 8, OPTS, c, 10e9, nics_per_node=2)  # two rings, one per link
        lat = sum(x.calls * x.hops() for x in cm.collectives(m, SHAPES, 32, OPTS)) * c.alpha_s
        assert math.isclose(two["net_s"] - lat, (f["net_s"] - lat) / 2, rel_tol=1e-12)
        one = cm.flat_comm(m, SHAPES, 8, 8, OPTS, c, 10e9)
        assert one["net_s"] == 0 and math.isclose(
            one["intra_s"], cm.intra_seconds(cm.collectives(m, SHAPES, 8, OPTS), c), rel_tol=1e-12)
    # one GPU per node: hierarchical is the flat method
    f = cm.flat_comm("powersgd", SHAPES, 4, 1, OPTS, c, 10e9)
    h = cm.hierarchical_comm("powersgd", SHAPES, 4, 1, OPTS, c, 10e9)
    assert math.isclose(f["comm_s"], h["comm_s"], rel_tol=1e-12) and h["intra_s"] == 0
    with pytest.raises(ValueError, match="not a multiple"):
        cm.hierarchical_comm("powersgd", SHAPES, 12, 8, OPTS, c, 10e9)
    with pytest.raises(ValueError, match="no hierarchical mode"):
        cm.hierarchical_method_collectives("dssync", SHAPES, 16, 8, OPTS)


def test_costmodel_cli_hierarchical_table(tmp_path, capsys):
    csv = tmp_path / "h.csv"
    assert cm.main(["--hierarchical", "--model", "digits_cnn", "--bandwidth", "1,100", "--png", "",
                    "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "flat vs hierarchical (node-aware): 8 GPUs per node, 1 network link(s)" in out
    assert "intra-node: 200 GB/s, 5 us per ring hop" in out
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("bandwidth_gbit,gpus,nodes,method,")
    assert len(rows) == 1 + 2 * 3 * 6  # 2 rates x 16/32/64 GPUs x 6 methods
    assert {r.split(",")[1] for r in rows[1:]} == {"16", "32", "64"}
    assert cm.main(["--hierarchical", "--gpus", "12", "--png", ""]) == 2  # not a multiple of 8 per node
    assert "not a multiple of --gpus-per-node 8" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- bench driver
def test_plan_and_overrides():
    plan = bh.build_plan()
    names = [r["name"] for r in plan["runs"]]
    assert len(names) == len(set(names)) == 12 + 2 + 25  # part (c)'s stage 0 runs are part (a)'s acpsgd runs
    for mode in ("flat", "hier"):
        acp = next(r for r in plan["runs"] if r["name"] == f"a-acpsgd-{mode}-z0-s0")
        assert acp["parts"] == ["a", "c"] and "model.width=64" in acp["sets"] and "train.epochs=2" in acp["sets"]
    hz1 = next(r for r in plan["runs"] if r["name"] == "c-acpsgd-hier-z1-s0")
    assert hz1["sets"][0] == "method.reducer={name: acpsgd, rank: 4, hierarchical: true}"
    assert "deepspeed.zero_optimization.stage=1" in hz1["sets"] and "model.hidden=2048" in hz1["sets"]
    # part (c) alone: acpsgd flat and hierarchical at ZeRO 0 and 1
    assert [r["name"] for r in bh.build_plan(["c"])["runs"]] == [
        "c-acpsgd-flat-z0-s0", "c-acpsgd-flat-z1-s0", "c-acpsgd-hier-z0-s0", "c-acpsgd-hier-z1-s0"]
    hq = next(r for r in plan["runs"] if r["name"] == "a-local_qsr-hier-z0-s0")
    assert hq["sets"][:2] == ["method.reducer={name: none}",
                              "method.sync={name: local, period: qsr, alpha: 0.0175, h_base: 4, hierarchical: true}"]
    b = next(r for r in plan["runs"] if r["name"] == "b-powersgd-hier-z0-s3")
    assert b["sets"][0] == "method.reducer={name: powersgd, rank: 1, start_powerSGD_iter: 0, hierarchical: true}"
    assert "train.seed=3" in b["sets"] and not any(s.startswith("model.") for s in b["sets"])
    from ds_ext.deepspeed.attach import hierarchical_zero
    from ds_ext.trainer.recipe import load_recipe  # every override is a valid recipe

    for r in (hq, b, hz1, next(x for x in plan["runs"] if x["name"] == "c-acpsgd-flat-z1-s0")):
        recipe = load_recipe("recipes/quickstart.yaml", r["sets"])
        assert recipe.method_names()["reducer"] == ("none" if r["method"] == "local_qsr" else r["method"])
        # ds_ext.initialize partitions ZeRO within the node (node_mpu) for the hierarchical ZeRO-1 run only
        assert hierarchical_zero(recipe) == (r is hz1)


def test_ring_arithmetic_and_windows():
    # flat ring 0-1-2-3 over 2 hosts x 2: 1->2 and 3->0 cross
    assert bh.crossing("all_reduce", 1000, [0, 1, 2, 3], 1, 2) == (1500.0, 0.0)
    assert bh.crossing("all_reduce", 1000, [0, 1, 2, 3], 0, 2) == (0.0, 1500.0)
    assert bh.crossing("all_gather", 1000, [0, 1, 2, 3], 3, 2) == (3000.0, 0.0)
    assert bh.crossing("all_reduce", 1000, [0, 2], 2, 2) == (1000.0, 1000.0)  # a cross-node pair
    assert bh.crossing("all_gather", 1000, [0, 1], 0, 2) == (0.0, 0.0)         # inside the host
    assert bh.kind_group("node_mean", 3, 4, 2, True) == [2, 3]
    assert bh.kind_group("powersgd_p", 3, 4, 2, True) == [1, 3]
    assert bh.kind_group("zero_allgather", 3, 4, 2, True) == [0, 1, 2, 3]
    # ZeRO partitioned within the node (node_mpu): its all-gather is a node kind and never crosses hosts
    assert "node_zero_allgather" in bh.NODE_KINDS and "node_zero_allgather" in bh.GATHER_KINDS
    assert bh.kind_group("node_zero_allgather", 3, 4, 2, True) == [2, 3]
    assert bh.crossing("all_gather", 1000, bh.kind_group("node_zero_allgather", 1, 4, 2, True), 1, 2) == (0.0, 0.0)
    assert bh.kind_group("powersgd_p", 3, 4, 2, False) == [0, 1, 2, 3]
    steps = [{}] * 10
    assert bh.windows(steps, 2) == [(0, 4), (5, 9)]
    assert bh.windows(steps, 3) == [(0, 9)]  # not whole epochs: one window over everything


def _synthetic_run(name, method, mode, seed, parts, acc, kinds, host_tx, zero=0, epochs=2, spe=5):
    """4 rank records of a run whose eth0 counters are exactly the ring expectation, plus 10 kB of evaluation
    traffic between the epochs (outside the windows). ZeRO 1: partitioned over all 4 ranks (flat) or within
    the node (hierarchical, as ``node_mpu`` makes it)."""
    run = {"name": name, "parts": parts, "method": method, "mode": mode, "seed": seed, "zero": zero, "sets": []}
    ranks = []
    for rank in range(4):
        steps, by_kind, iface, t = [], {}, [0, 0, 0, 0], 0.0
        for i in range(epochs * spe):
            if i and i % spe == 0:
                iface = [iface[0] + 10_000, iface[1] + 10_000, iface[2] + 10, iface[3] + 10]
            for k, b in kinds.items():
                by_kind[k] = by_kind.get(k, 0) + b
            iface = [iface[0] + host_tx, iface[1] + host_tx, iface[2] + 2, iface[3] + 2]
            t += 0.05
            colls = [["all_gather" if k in bh.GATHER_KINDS else "all_reduce", b, k,
                      bh.kind_group(k, rank, 4, 2, mode == "hier")] for k, b in kinds.items()]
            steps.append({"step": i + 1, "t": t, "by_kind": dict(by_kind), "total": sum(by_kind.values()),
                          "iface": list(iface), "lo": [0, 0, 0, 0], "colls": colls})
        group = ([] if not zero else [rank // 2 * 2, rank // 2 * 2 + 1] if mode == "hier" else [0, 1, 2, 3])
        parts_n = len(group) or 1
        mem = {"optimizer_state_bytes": 4000 // parts_n, "fp32_master_bytes": 4000 // parts_n if zero else 0,
               "param_bytes": 4000, "partition_numel": [1000 // parts_n] if zero else [], "optimizer": "x",
               "inner_optimizer": "SGD", "process_max_rss_kib": 1024}
        if zero:
            mem.update(zero_dp_group_ranks=group, zero_real_dp_group_ranks=[group], zero_partition_count=[parts_n],
                       zero_node_partitioned=mode == "hier",
                       zero_allgather_kind="node_zero_allgather" if mode == "hier" else "zero_allgather")
        ranks.append({"run": run, "rank": rank, "world": 4, "local_size": 2, "interface": "eth0", "code": 0, "error": None,
                      "wall_s": 1.0, "memory": mem, "epochs": epochs, "steps": steps,
                      "summary": {"val_acc": acc} if rank == 0 else None})
    return ranks


def _synthetic_runs():
    runs = []
    flat = {"allreduce": 1000}                                           # host tx: 1.5 x 1000
    hier = {"node_mean": 1000, "powersgd_p": 100, "node_gather": 500}    # host tx: 2 ranks x 100
    for seed, (fa, ha) in enumerate([(0.90, 0.92), (0.91, 0.91), (0.89, 0.93)]):
        runs.append(bh.analyze_run(_synthetic_run(f"b-powersgd-flat-s{seed}", "powersgd", "flat", seed, ["b"], fa,
                                                  {"powersgd_p": 100}, 150)))
        runs.append(bh.analyze_run(_synthetic_run(f"b-powersgd-hier-s{seed}", "powersgd", "hier", seed, ["b"], ha,
                                                  hier, 200)))
        runs.append(bh.analyze_run(_synthetic_run(f"b-allreduce-flat-s{seed}", "allreduce", "flat", seed, ["b"],
                                                  0.95, flat, 1500)))
    runs.append(bh.analyze_run(_synthetic_run("a-allreduce-flat", "allreduce", "flat", 0, ["a"], 0.9, flat, 1500)))
    runs.append(bh.analyze_run(_synthetic_run("a-allreduce-hier", "allreduce", "hier", 0, ["a"], 0.9,
                                              {"node_mean": 1000, "allreduce": 500, "node_gather": 500}, 1000)))
    # part (c): host tx flat = 1.5 x 200 (+ 3 x 250 of ZeRO's all-gather at ZeRO 1); hierarchical = 2 ranks x 100,
    # ZeRO's all-gather (within the node) adds nothing
    acp_hier = {"node_mean": 4000, "acpsgd_p": 100, "node_gather": 2000}
    for mode, zero, kinds, tx in (("flat", 0, {"acpsgd_p": 200}, 300),
                                  ("flat", 1, {"acpsgd_p": 200, "zero_allgather": 250}, 300 + 750),
                                  ("hier", 0, acp_hier, 200),
                                  ("hier", 1, dict(acp_hier, node_zero_allgather=500), 200)):
        runs.append(bh.analyze_run(_synthetic_run(f"c-acpsgd-{mode}-z{zero}", "acpsgd", mode, 0, ["c"], 0.9, kinds, tx,
                                                  zero=zero)))
    return runs


def test_analysis_of_a_synthetic_result_matches_the_ring_arithmetic():
    runs = {r["name"]: r for r in _synthetic_runs()}
    f, h = runs["b-powersgd-flat-s0"], runs["b-powersgd-hier-s0"]
    assert f["window_steps"] == h["window_steps"] == 8  # 2 epochs x (5 - 1) steps; evaluation left out
    assert math.isclose(f["step_ms"], 50.0)
    assert f["meter_expected"] == 300.0 and f["iface"] == 300.0 and f["ratio_raw"] == 1.0
    assert math.isclose(f["ratio_payload"], (300 - 4 * 66) / 300)  # 4 packets per step of 66 framing bytes
    assert h["meter_cross_per_rank_step"] == 100 and h["meter_node_per_rank_step"] == 1500
    assert h["meter_payload"] == 200 and h["meter_expected"] == 400.0 and h["ratio_raw"] == 1.0
    assert h["coll_expected"] == h["meter_expected"]  # the recorded calls give the same arithmetic
    z = runs["c-acpsgd-flat-z1"]
    assert z["meter_expected"] == 2 * (1.5 * 200 + 3 * 250) and z["ratio_raw"] == 1.0
    hz0, hz1 = runs["c-acpsgd-hier-z0"], runs["c-acpsgd-hier-z1"]
    # the node-partitioned all-gather stays out of the cross-node bytes
    assert hz1["meter_expected"] == hz0["meter_expected"] == 400.0 and hz1["ratio_raw"] == 1.0
    assert hz1["meter_cross_per_rank_step"] == 100 and hz1["meter_node_per_rank_step"] == 6500


def test_tables_from_a_synthetic_result():
    runs = _synthetic_runs()
    acc = {(r["method"], r["mode"]): r for r in bh.accuracy_rows(runs)}
    assert acc[("allreduce", "flat")]["n"] == 3 and math.isclose(acc[("allreduce", "flat")]["mean"], 0.95)
    assert math.isclose(acc[("powersgd", "hier")]["mean"], 0.92) and math.isclose(acc[("powersgd", "hier")]["std"], 0.01)
    assert math.isclose(acc[("powersgd", "flat")]["gap"], -0.05)
    (p,) = bh.paired_rows(runs)
    assert p["method"] == "powersgd" and p["n"] == 3 and (p["hier_better"], p["equal"], p["flat_better"]) == (2, 1, 0)
    assert math.isclose(p["mean"], 0.02)
    (c,) = bh.comparison_rows(runs, "a")
    assert c["method"] == "allreduce" and math.isclose(c["eth0_ratio"], 2000 / 3000)
    md = bh.tables_markdown(runs, {"bandwidth": "1gbit", "command": "bash run/bench-hier.sh", "wall_s": 60.0,
                                   "projection": "## flat vs hierarchical\n..."})
    assert "links 1gbit" in md and "Command: `bash run/bench-hier.sh`; wall time 1.0 min" in md
    # 3000 B/step on eth0 = the ring expectation; 4 packets x 66 framing bytes come off "without framing"
    assert "| allreduce | flat | 0.98 | 1.95 | 2.93 | 2.93 | 2.67 | **1.000**; 0.912 |" in md
    assert "| powersgd | hier | 3 | 0.9200 ± 0.0100 | -3.00 pt | 0.9200, 0.9100, 0.9300 |" in md
    assert "| powersgd | 3 | +2.00, +0.00, +4.00 | +2.00 ± 2.00 | 1.73 | 2 / 1 / 0 |" in md
    # part (c): flat ZeRO 1 keeps a quarter of the momentum plus the fp32 master partition, over all 4 ranks;
    # hierarchical ZeRO 1 half of it, within the node, and its all-gather adds nothing to eth0
    z = {(r["mode"], r["zero"]): r for r in bh.zero_rows(runs)}
    assert list(z) == [("flat", 0), ("flat", 1), ("hier", 0), ("hier", 1)]
    assert z[("flat", 1)]["state_vs_z0"] == 0.25 and z[("hier", 1)]["state_vs_z0"] == 0.5
    assert z[("flat", 1)]["zero_groups"] == [(0, 1, 2, 3)] and z[("hier", 1)]["zero_groups"] == [(0, 1), (2, 3)]
    assert z[("flat", 1)]["iface_minus_z0"] == 1500 and z[("hier", 1)]["iface_minus_z0"] == 0
    assert z[("hier", 1)]["zero_allgather"] == 500 and z[("hier", 1)]["zero_allgather_kinds"] == ["node_zero_allgather"]
    assert "| flat | 0 | - | 3.91 KiB | 1.000 | 0.00 KiB | 3.91 KiB | 1.000 | - | 50.0 | 0.00 KiB | 0.20 KiB |" in md
    assert ("| flat | 1 | {0,1,2,3} | 0.98 KiB | 0.250 | 0.98 KiB | 1.95 KiB | 0.500 | [250] | 50.0 "
            "| 0.24 KiB (zero_allgather) | 0.20 KiB | 2.05 KiB | +1.46 KiB | 2.05 KiB | 1.000;") in md
    assert ("| hier | 1 | {0,1} {2,3} | 1.95 KiB | 0.500 | 1.95 KiB | 3.91 KiB | 1.000 | [500] | 50.0 "
            "| 0.49 KiB (node_zero_allgather) | 0.10 KiB | 0.39 KiB | +0.00 KiB | 0.39 KiB | 1.000;") in md
    assert "cost model: flat vs hierarchical projection" in md and "failed runs" not in md
    only_c = bh.tables_markdown([r for r in runs if r["parts"] == ["c"]])  # run/bench-hier.sh --parts c
    assert "## (c) ZeRO-1 vs ZeRO-0" in only_c and "## (a)" not in only_c and "## (b)" not in only_c
