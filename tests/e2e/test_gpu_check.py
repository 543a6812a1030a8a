"""run/gpu-check.sh --dry-run (no GPU, nothing installed): the plan of the one-shot GPU check and its own checks.

The dry run prints each step with its budget and DS_EXT_OPS, the total (at most 480 s on one GPU), every step's
command, and runs run/gpu_check_dry.py: the pytest selections of steps 4-6 collect tests, the scripts and
benchmarks accept their arguments, the trainer's overrides validate, the pins agree. One dry run serves every
assertion here (module fixture), pinned to the online install path (DS_EXT_GPU_FORCE_OFFLINE=0); the offline
path (no package index: the host's CUDA torch, .whl/ from --fetch-wheels, nvcc only where the host has one) is
planned with DS_EXT_GPU_FORCE_OFFLINE=1 and DS_EXT_GPU_DRY_HOST_CUDA pretending the host's torch.
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


def _dry_run(tmp: Path, **extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_EXT_PYTHON=sys.executable, OUT=str(tmp / "out"), DS_EXT_GPU_VENV=str(tmp / "never-made"),
               DS_EXT_GPU_WHEELS=str(tmp / "no-wheels"))
    for k in ("DS_EXT_GPU_FORCE_OFFLINE", "DS_EXT_GPU_NVCC", "DS_EXT_GPU_DRY_HOST_CUDA"):
        env.pop(k, None)
    env.update(extra)
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert not (tmp / "never-made").exists(), "--dry-run created the venv"
    return p


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    return _dry_run(tmp_path_factory.mktemp("gpu-check"), DS_EXT_GPU_FORCE_OFFLINE="0")


def _fake_nvcc(tmp: Path, release: str) -> str:
    nvcc = tmp / f"cuda-{release}" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(nvcc)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The offline plans: host CUDA torch 13.0 with a matching nvcc, with none, with a CUDA 12 one; no CUDA torch."""
    tmp = tmp_path_factory.mktemp("gpu-check-offline")
    # the Python checks do not depend on the install path: the online run (``dry``) makes them once
    off = dict(DS_EXT_GPU_FORCE_OFFLINE="1", DS_EXT_GPU_DRY_HOST_CUDA="13.0", DS_EXT_GPU_DRY_PY="0")
    return {
        "nvcc": _dry_run(tmp / "a", **off, DS_EXT_GPU_NVCC=_fake_nvcc(tmp, "13.0")),
        "no-nvcc": _dry_run(tmp / "b", **off, DS_EXT_GPU_NVCC="none"),
        "nvcc-12": _dry_run(tmp / "c", **off, DS_EXT_GPU_NVCC=_fake_nvcc(tmp, "12.4")),
        "none": _dry_run(tmp / "d", DS_EXT_GPU_FORCE_OFFLINE="1", DS_EXT_GPU_DRY_HOST_CUDA="none", DS_EXT_GPU_DRY_PY="0"),
    }


def _step(out: str, sid: str) -> str:
    return re.search(rf"^\[step {sid}\] (.*)$", out, re.M).group(1)


def _plan(out: str) -> dict:
    """step id -> (budget s, DS_EXT_OPS, needs), from the plan table."""
    rows = re.findall(r"^(\d+)\s+.+?\s+(\d+)s\s+(auto|compiled|torch)\s+(\S+)$", out, re.M)
    return {sid: (int(b), ops, need) for sid, b, ops, need in rows}


def test_dry_run_passes_and_lists_every_step(dry):
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-2000:]
    assert "dry run: OK" in dry.stdout
    assert "install path: online (DS_EXT_GPU_FORCE_OFFLINE=0)" in dry.stdout
    assert "planned SKIP" not in dry.stdout
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


def test_offline_plan_uses_the_hosts_torch_and_carried_wheels(offline):
    for name in ("nvcc", "no-nvcc", "nvcc-12"):
        p = offline[name]
        assert p.returncode == 0 and "dry run: OK" in p.stdout, (name, p.stdout[-3000:] + p.stderr[-2000:])
        assert re.search(r"^install path: offline \(DS_EXT_GPU_FORCE_OFFLINE=1\): the host's torch .*CUDA 13\.0",
                         p.stdout, re.M), name
        step2 = _step(p.stdout, "2")
        assert "--system-site-packages" in step2 and "ds_ext_offline_install" in step2 and "DS_EXT_WHEELS=" in step2
        # never a torch, never the CUDA wheels: the online installer is not called
        assert "ds_ext_cuda_install" not in step2 and "torch==" not in step2 and "cuda-toolkit" not in step2
        line = next(x for x in p.stdout.splitlines() if x.startswith("install offline: "))
        assert "--no-deps" in line and "pytest" in line and "pyyaml" in line and "wandb" not in line.split("left out")[0]
        assert list(_plan(p.stdout)) == ONE_GPU_STEPS + MULTI_GPU_STEPS
    plan = _plan(offline["nvcc"].stdout)
    assert "planned SKIP" not in offline["nvcc"].stdout
    assert {s for s, (_, ops, _) in plan.items() if ops == "compiled"} == {"3", "4"}
    assert "cuda-13.0" in _step(offline["nvcc"].stdout, "2") and "ds_ext_cuda_toolchain" in _step(offline["nvcc"].stdout, "2")


@pytest.mark.parametrize("name, why", [("no-nvcc", "DS_EXT_GPU_NVCC=none"), ("nvcc-12", "is CUDA 12.4")])
def test_offline_without_usable_nvcc_skips_the_op_steps_only(offline, name, why):
    out = offline[name].stdout
    skips = dict(re.findall(r"^planned SKIP: step (\d+) \((.*)\)$", out, re.M))
    assert set(skips) == {"3", "4"}, skips
    assert why in skips["3"] and "DS_EXT_OPS=torch" in skips["3"]
    plan = _plan(out)
    assert all(plan[s][1] == "torch" for s in ONE_GPU_STEPS[4:] + MULTI_GPU_STEPS), plan
    assert "ds_ext_cuda_toolchain" not in _step(out, "2") and "nvcc --version" not in _step(out, "2")


def test_no_index_and_no_cuda_torch_fails_the_install_with_both_ways_out(offline):
    p = offline["none"]
    assert p.returncode == 0 and "dry run: OK" in p.stdout, p.stdout[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("install path: "))
    assert line.startswith("install path: none: gpu-check: cannot install:")
    assert "no CUDA torch" in line and "network" in line and "--fetch-wheels" in line
    step2 = _step(p.stdout, "2")
    assert step2.endswith("exit 1") and "fetch-wheels" in step2
    assert subprocess.run(["bash", "-c", step2], capture_output=True, text=True).returncode == 1


def test_the_install_path_is_probed_and_printed(tmp_path):
    p = _dry_run(tmp_path)  # no DS_EXT_GPU_FORCE_OFFLINE: the index is asked (<= 8 s)
    assert p.returncode == 0, p.stdout[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("install path: "))
    assert re.match(r"install path: (online \(\S+ answered\)|offline \(\S+ did not answer within 5 s\)|none: )", line)


def test_bad_argument_and_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "run" / "cuda-venv.sh")]).returncode == 0
    for args in (["--bogus"], ["--dry-run", "--fetch-wheels"]):
        p = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert p.returncode == 64 and ("unknown argument" in p.stderr or "exclude" in p.stderr), (args, p.stderr)


def test_wheels_are_git_ignored():
    p = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert p.returncode == 0, ".whl/ must be git-ignored: it travels as a carried path, not in the repository"
