"""run/gpu-check.sh --dry-run (no GPU, nothing installed): the plan of the one-shot GPU check and its own checks.

The dry run prints each step with its budget and DS_EXT_OPS, the total (at most 480 s on one GPU), every step's
command, and runs run/gpu_check_dry.py: the pytest selections of steps 4-6 collect tests, the scripts and
benchmarks accept their arguments, the trainer's overrides validate, the pins agree. One dry run serves every
assertion here (module fixture).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "run" / "gpu-check.sh"
ONE_GPU_STEPS = [str(i) for i in range(1, 10)]
MULTI_GPU_STEPS = ["10", "11"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    env = dict(os.environ, DS_EXT_PYTHON=sys.executable, OUT=str(tmp_path_factory.mktemp("gpu-check")),
               DS_EXT_GPU_VENV=str(tmp_path_factory.mktemp("venv") / "never-made"))
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert not (Path(env["DS_EXT_GPU_VENV"])).exists(), "--dry-run created the venv"
    return p


def _plan(out: str) -> dict:
    """step id -> (budget s, DS_EXT_OPS, needs), from the plan table."""
    rows = re.findall(r"^(\d+)\s+.+?\s+(\d+)s\s+(auto|compiled|torch)\s+(\S+)$", out, re.M)
    return {sid: (int(b), ops, need) for sid, b, ops, need in rows}


def test_dry_run_passes_and_lists_every_step(dry):
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-2000:]
    assert "dry run: OK" in dry.stdout
    plan = _plan(dry.stdout)
    assert list(plan) == ONE_GPU_STEPS + MULTI_GPU_STEPS, plan
    for sid in plan:
        assert re.search(rf"^\[step {sid}\] \S", dry.stdout, re.M), f"step {sid}'s command is not echoed"
    assert all(plan[s][2] == "gpus2" for s in MULTI_GPU_STEPS)
    assert not any(plan[s][2] == "gpus2" for s in ONE_GPU_STEPS)


def test_budget_total_at_most_8_minutes(dry):
    plan = _plan(dry.stdout)
    total = int(re.search(r"total budget, one GPU: (\d+) s", dry.stdout).group(1))
    assert total == sum(plan[s][0] for s in ONE_GPU_STEPS)
    assert total <= 480
    assert all(plan[s][0] > 0 for s in plan)


def test_compiled_ops_only_where_the_op_is_tested(dry):
    plan = _plan(dry.stdout)
    assert {s for s, (_, ops, _) in plan.items() if ops == "compiled"} == {"3", "4"}
    step3 = re.search(r"^\[step 3\] (.*)$", dry.stdout, re.M).group(1)
    assert "TORCH_CUDA_ARCH_LIST=$ARCH" in step3 and 'prepare' in dry.stdout


def test_gpu_tests_and_scripts_exist(dry):
    counts = re.findall(r"^\[dry-run\] ok\s+pytest (.+) collects tests: (\d+) collected$", dry.stdout, re.M)
    assert len(counts) == 3 and all(int(n) > 0 for _, n in counts), counts
    assert any("test_one_rank_nccl" in sel for sel, _ in counts)
    assert any("test_method_on_cuda" in sel for sel, _ in counts)
    assert "[dry-run] ok   tests/dist/cuda_syncs.py --list" in dry.stdout
    assert re.search(r"^\[dry-run\] all \d+ Python checks passed$", dry.stdout, re.M)
    assert "FAIL" not in dry.stdout


def test_pinned_install(dry):
    line = next(x for x in dry.stdout.splitlines() if x.startswith("install: "))
    assert re.search(r"torch==\d", line) and re.search(r"deepspeed==0\.19\.\d", line) and "cuda-toolkit[nvcc" in line
    for pkg in ("pytest", "pyyaml", "scikit-learn", "ninja", "pydantic"):
        assert pkg in line, pkg


def test_bad_argument_and_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    p = subprocess.run(["bash", str(SCRIPT), "--fetch-wheels"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 64 and "unknown argument" in p.stderr
