"""The end-to-end benchmark's driver (``benchmarks.train``, the body of ``run/bench-train.sh``) on 2 local ranks
without shaping (no cluster, no root): its output structure, not its figures (a benchmark, not a timed test);
PyTorch DDP's baseline registers PyTorch's own hook functions, unmodified, and runs without DeepSpeed; the report
and the cost model's check read the result."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_ext.costmodel import model as cm
from benchmarks import train as bt
from tests.harness import run

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["allreduce", "acpsgd", "deepspeed", "ddp_allreduce", "ddp_powersgd"]
CFG = dict(model="resnet18", image_size=16, batch=2, classes=10, steps=2, warmup=2, pin=True)


def test_ddp_baseline_hooks_are_pytorchs_own_functions():
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    hook, state = bt.ddp_hook("ddp_allreduce")
    assert hook is default_hooks.allreduce_hook and state is None
    hook, state = bt.ddp_hook("ddp_powersgd", rank=4)
    assert hook is powerSGD_hook.powerSGD_hook and type(state) is powerSGD_hook.PowerSGDState
    # the same rank and compression rule as our powersgd; PyTorch's smallest start with error feedback / warm start
    ours = cm.method_specs(cm.MethodOptions())["powersgd"][1]
    assert state.matrix_approximation_rank == ours["rank"] == 4
    assert state.min_compression_rate == 2 and state.use_error_feedback and state.warm_start
    assert state.start_powerSGD_iter == bt.DDP_START_POWERSGD_ITER == 2
    with pytest.raises(ValueError):
        bt.ddp_hook("allreduce")


def test_union_length():
    assert bt.union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert bt.union_length([(0, 2), (1, 3), (5, 6)], 1.5, 5.5) == 2.0
    assert bt.union_length([]) == 0


@pytest.fixture(scope="module")
def local_result():
    """Every rank's result of one driver run: 2 local ranks, each pinned to a core, no shaping."""
    return run(bt.worker, 2, timeout=900, methods=METHODS, **CFG)


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
        for m, rec in r["methods"].items():
            assert len(rec["samples"]) == CFG["steps"] and rec["period"] == 1
            for s in rec["samples"]:
                assert 0 < s["t_fwd"] <= s["t_ready"] <= s["t_end"] and math.isfinite(s["loss"])
                assert s["colls"], (m, "no collective recorded")
                for op, nbytes, a, d in s["colls"]:
                    assert op in ("all_reduce", "all_gather") and nbytes > 0 and 0 <= a <= d <= s["t_end"] + 1e-6
    # every method's gradients went through a collective during or after backward; ours launch during backward
    rows = bt.summarize(res)
    assert set(rows) == set(METHODS)
    for m, row in rows.items():
        assert row["samples_per_s"] > 0 and row["comm_ms"] > 0 and 0 <= row["hidden_ms"] <= row["comm_ms"] + 1e-9
        assert 0.0 <= row["hidden_frac"] <= 1.0 + 1e-9
    grads = 4 * sum(cm.numel_of(s) for s in res["shapes"])
    for m in ("allreduce", "deepspeed", "ddp_allreduce"):  # the whole gradient, once
        assert rows[m]["payload_bytes"] >= grads
    assert rows["acpsgd"]["payload_bytes"] < grads / 10 and rows["ddp_powersgd"]["payload_bytes"] < grads / 10
    assert rows["allreduce"]["launch_frac"], "allreduce launches buckets during backward"
    # DeepSpeed's own reduction runs inside engine.backward, after autograd: nothing hidden
    assert rows["deepspeed"]["hidden_ms"] == 0
    # the DDP baseline registered PyTorch's hook function objects themselves
    info = rows["ddp_allreduce"]["info"]
    assert info["hook_is_torch_function"] and info["hook"].endswith("default_hooks.allreduce_hook")
    info = rows["ddp_powersgd"]["info"]
    assert info["hook_is_torch_function"] and info["hook"].endswith("powerSGD_hook.powerSGD_hook")
    assert info["matrix_approximation_rank"] == 4 and info["start_powerSGD_iter"] == 2
    assert info["bucket_cap_mb_given"] >= grads / 2**20   # one bucket (DDP_POWERSGD_ONE_BUCKET)
    assert rows["allreduce"]["info"]["reducer"] == "AllreduceReducer"
    assert rows["deepspeed"]["info"]["reducer"] == "DeepSpeedReducer"

    # the report: table.md, results.json, the cost model's check (links 'local': nothing to model)
    (tmp_path / "ds.json").write_text(json.dumps(res))
    assert bt.main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "table.md").read_text()
    for m in METHODS:
        assert f"| `{m}` " in md
    assert "x DDP allreduce_hook" in md and "hidden behind backward" in md
    out = json.loads((tmp_path / "results.json").read_text())
    assert set(out["merged"]["rows"]) == set(METHODS)
    # the check needs a link rate: the same result labelled 500mbit is checked for every method
    res_500 = dict(res, bandwidth="500mbit", _file=str(tmp_path / "ds.json"))
    check = cm.train_check(bt.merged([res_500]))
    assert set(check["rows"]) == set(METHODS) and check["eta"] > 0
    for m, x in check["rows"].items():
        assert x["model_step_ms"] > 0 and math.isfinite(x["err"])
    assert check["rows"]["allreduce"]["launch_ready"] and check["rows"]["deepspeed"]["model_hidden_ms"] == 0


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


def test_cli_refuses_mixed_launches(capsys):
    with pytest.raises(SystemExit):
        bt.main(["run", "--methods", "allreduce,ddp_allreduce"])
    assert "need --ddp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bt.main(["run", "--ddp", "--methods", "powersgd"])
    assert "cannot run with --ddp" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
