"""The end-to-end benchmark's driver (``benchmarks.train``, the body of ``run/bench-train.sh``) on 2 local ranks
without shaping (no cluster, no root): its output structure, not its figures (a benchmark, not a timed test): two
rounds, every method once per round; PyTorch DDP's baselines register PyTorch's own hook functions, unmodified
(``ddp_powersgd`` with DDP's buckets through the serialising wrapper, which runs on gloo where the bare hook aborts);
a DDP-only launch runs without DeepSpeed; the report and the cost model's check read the result. The report's
arithmetic itself: tests/unit/test_bench_train_report.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import costmodel_fit as fit
from ds_ext.costmodel import model as cm
from ds_ext.costmodel import presets as ps
from benchmarks import results as bench_results
from benchmarks import train as bt
from tests.harness import run

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["allreduce", "acpsgd", "deepspeed", "ddp_allreduce", "ddp_powersgd", "ddp_powersgd_1b", "ddp_fp16"]
CFG = dict(model="resnet18", image_size=16, batch=2, classes=10, steps=1, warmup=1, rounds=2, pin=True)


def test_ddp_baseline_hooks_are_pytorchs_own_functions():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    hook, state = bt.ddp_hook("ddp_allreduce")
    assert hook is default_hooks.allreduce_hook and state is None
    hook, state = bt.ddp_hook("ddp_powersgd_1b", rank=4)
    assert hook is powerSGD_hook.powerSGD_hook and type(state) is powerSGD_hook.PowerSGDState
    serialized, _ = bt.ddp_hook("ddp_powersgd", rank=4)
    assert serialized.__wrapped__ is powerSGD_hook.powerSGD_hook
    assert bt.ddp_hook("ddp_fp16")[0] is default_hooks.fp16_compress_hook
    # the same rank and compression rule as our powersgd; PyTorch's smallest start with error feedback / warm start
    ours = ps.method_specs(ps.MethodOptions())["powersgd"][1]
    assert state.matrix_approximation_rank == ours["rank"] == 4
    assert state.min_compression_rate == 2 and state.use_error_feedback and state.warm_start
    assert state.start_powerSGD_iter == bt.DDP_START_POWERSGD_ITER == 2
    with pytest.raises(ValueError):
        bt.ddp_hook("allreduce")


def test_union_length():
    assert bench_results.union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert bench_results.union_length([(0, 2), (1, 3), (5, 6)], 1.5, 5.5) == 2.0
    assert bench_results.union_length([]) == 0


def test_ddp_powersgd_hook_with_several_buckets_runs_serialised_on_gloo():
    """PyTorch's powerSGD_hook with 4 DDP buckets on 2 gloo ranks, through ``serialized_hook``: every step
    compresses (the hook's own iteration count), every bucket gets its own P/Q state, and the replicas stay equal.
    (The bare hook aborts here: ``python -m benchmarks.ddp_powersgd_gloo``, a race, so not a test.)"""
    from benchmarks import ddp_powersgd_gloo as rep

    got = rep.run_variant("serialized", steps=4)
    assert got["ok"], got
    assert got["iter"] == [4, 4] and got["replicas_equal"] and got["buckets"] == 4


@pytest.fixture(scope="module")
def local_result():
    """Every rank's result of one driver run: 2 local ranks, each pinned to a core, no shaping."""
    return run(bt.worker, 2, timeout=900, methods=METHODS, **CFG)


@pytest.mark.slow
def test_driver_runs_on_two_local_ranks(local_result, tmp_path):
    res, other = local_result
    assert other is None and res["kind"] == "benchmarks.train" and res["world"] == 2 and res["pinned"]
    cores = [r["core"] for r in res["ranks"]]
    assert all(r["masks"] == [[r["core"]]] for r in res["ranks"]), "every thread of a rank on its core"
    assert len(set(cores)) == min(2, len(os.sched_getaffinity(0)))
    for r in res["ranks"]:
        al = r["alone"]
        assert al["fwd_ms"] > 0 and al["bwd_ms"] > 0 and al["opt_ms"] > 0
        assert len(al["ready_frac"]) == len(res["shapes"]) and max(al["ready_frac"]) == pytest.approx(1.0)
        assert set(r["methods"]) == set(METHODS)
        assert [s["round"] for s in r["reference"]["samples"]] == [0, 1]     # compute alone once per round
        for m, rec in r["methods"].items():
            assert len(rec["samples"]) == CFG["steps"] * CFG["rounds"] and rec["period"] == 1
            assert [s["round"] for s in rec["samples"]] == [0, 1]
            for s in rec["samples"]:
                assert 0 < s["t_fwd"] <= s["t_ready"] <= s["t_end"]
                # ResNet-18 at 16 px, batch 2: BatchNorm over 2 values at 1 x 1 gives gradients of 1e6, beyond fp16's
                # 65504, and DDP's fp16 hook has no guard (ResNet-50 128 px batch 4, the benchmark's: |g| < 40)
                assert math.isfinite(s["loss"]) or m == "ddp_fp16"
                assert s["colls"], (m, "no collective recorded")
                for op, nbytes, a, d in s["colls"]:
                    assert op in ("all_reduce", "all_gather") and nbytes > 0 and 0 <= a <= d <= s["t_end"] + 1e-6
    # every method's gradients went through a collective during or after backward; ours launch during backward
    assert res["rounds"] == 2 and [e[1] for e in res["sequence"]] == [m for o in res["order"] for m in o]
    assert res["order"][1] != res["order"][0] and sorted(res["order"][1]) == sorted(["alone"] + METHODS)
    rows = bench_results.summarize(res)
    assert set(rows) == set(METHODS)
    for m, row in rows.items():
        assert row["n_rounds"] == 2 and row["samples_per_s"] > 0 and row["comm_ms"] > 0
        assert 0 <= row["overlap_ms"] <= row["comm_ms"] + 1e-9 and 0.0 <= row["overlap_frac"] <= 1.0 + 1e-9
        assert row["post_comm_ms"] >= 0 and row["first_launch_frac"] >= 0 and row["cpu_process_ms"] > 0
        assert row["x_ddp_allreduce"] > 0 and row["x_ddp_powersgd"] > 0 and row["x_ddp_powersgd_1b"] > 0
    grads = 4 * sum(cm.numel_of(s) for s in res["shapes"])
    for m in ("allreduce", "deepspeed", "ddp_allreduce"):  # the whole gradient, once
        assert rows[m]["payload_bytes"] >= grads
    assert rows["acpsgd"]["payload_bytes"] < grads / 10 and rows["ddp_powersgd"]["payload_bytes"] < grads / 10
    assert rows["ddp_powersgd_1b"]["payload_bytes"] < grads / 10
    assert rows["ddp_fp16"]["payload_bytes"] == pytest.approx(grads / 2, rel=0.01)
    assert rows["allreduce"]["launch_frac"], "allreduce launches buckets during backward"
    # DeepSpeed's own reduction runs inside engine.backward, after autograd: no overlap; the one-bucket hook too
    assert rows["deepspeed"]["overlap_ms"] == 0 and rows["deepspeed"]["first_launch_frac"] >= 1.0
    assert rows["ddp_powersgd_1b"]["first_launch_frac"] >= 1.0
    # the DDP baseline registered PyTorch's hook function objects themselves
    info = rows["ddp_allreduce"]["info"]
    assert info["hook_is_torch_function"] and info["hook"].endswith("default_hooks.allreduce_hook")
    for m in ("ddp_powersgd", "ddp_powersgd_1b"):
        info = rows[m]["info"]
        assert info["hook_is_torch_function"] and info["hook"].endswith("powerSGD_hook.powerSGD_hook")
        assert info["matrix_approximation_rank"] == 4 and info["start_powerSGD_iter"] == 2
        assert info["iteration"] == 3 + CFG["steps"]       # warm-up start_powerSGD_iter + 1, then compressed steps
    assert rows["ddp_powersgd"]["info"]["serialized"] and len(rows["ddp_powersgd"]["info"]["bucket_bytes"]) > 1
    assert rows["ddp_powersgd_1b"]["info"]["bucket_cap_mb_given"] >= grads / 2**20
    assert len(rows["ddp_powersgd_1b"]["info"]["bucket_bytes"]) == 1
    assert rows["ddp_fp16"]["info"]["hook"].endswith("default_hooks.fp16_compress_hook")
    assert rows["allreduce"]["info"]["reducer"] == "AllreduceReducer"
    assert rows["deepspeed"]["info"]["reducer"] == "DeepSpeedReducer"

    # the report: table.md, results.json, the cost model's check (links 'local': nothing to model)
    (tmp_path / "train.json").write_text(json.dumps(res))
    assert bt.main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "table.md").read_text()
    for m in METHODS:
        assert f"| `{m}` " in md
    assert "x DDP allreduce_hook" in md and "overlap %" in md and "hidden" not in md
    out = json.loads((tmp_path / "results.json").read_text())
    assert set(out["merged"]["rows"]) == set(METHODS)
    # the check needs a link rate: the same result labelled 500mbit is checked for every method
    res_500 = dict(res, bandwidth="500mbit", _file=str(tmp_path / "train.json"))
    check = fit.train_check(bench_results.merged([res_500]))
    assert set(check["rows"]) == set(METHODS) and check["eta"] > 0
    for m, x in check["rows"].items():
        assert x["model_step_ms"] > 0 and math.isfinite(x["err"])
    assert check["rows"]["allreduce"]["launch_ready"] and check["rows"]["deepspeed"]["model_overlap_ms"] == 0


def test_ddp_mode_imports_no_deepspeed(tmp_path):
    """``run --ddp`` builds its process group with torch.distributed alone and imports no DeepSpeed while it measures
    (only afterwards, to gather the results through ds_ext.comm); world of 1 here: the structure, not the traffic."""
    code = f"""
import os, sys, json
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}", RANK="0", WORLD_SIZE="1")
import torch.distributed as dist
dist.init_process_group("gloo")
from benchmarks import train as bt
before = "deepspeed" in sys.modules
res = bt.bench(dict(methods=["ddp_allreduce"], model="resnet18", image_size=16, batch=2, classes=10, steps=1,
                    warmup=2, bandwidth="local", ddp=True, core=None))
print(json.dumps({{"before": before, "imported": res["deepspeed_imported"],
                  "hook": res["ranks"][0]["methods"]["ddp_allreduce"]["info"]["hook_is_torch_function"]}}))
dist.destroy_process_group()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"before": False, "imported": False, "hook": True}


def test_cli_refuses_bad_method_lists(capsys):
    with pytest.raises(SystemExit):
        bt.main(["run", "--ddp", "--methods", "powersgd"])
    assert "cannot run with --ddp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bt.main(["run", "--methods", "allreduce,nosuch"])
    assert "unknown nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bt.main(["run", "--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
