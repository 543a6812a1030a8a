"""``python -m benchmarks.convergence`` end to end (issue 31): two methods, one seed, a few steps on the pytext
recipe through the deepspeed launcher; the table, the time-to-loss table and the plot come out, and a second
invocation reuses the finished cells. Slow (two trainer launches); the report code's fast check is
tests/unit/test_convergence_table.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_convergence_run_reports_and_resumes(tmp_path):
    out = tmp_path / "conv"
    cmd = [sys.executable, "-m", "benchmarks.convergence", "--methods", "S-SGD,topk-0.01", "--seeds", "0",
           "--epochs", "2", "--steps-per-epoch", "2", "--out", str(out), "--gpus", "8,64", "--timeout", "400",
           "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.max_val_windows=32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[1/2] S-SGD seed 0: training" in r.stdout and "[2/2] topk-0.01 seed 0 (" in r.stdout
    report = (out / "report.txt").read_text()
    assert "data Python " + ".".join(map(str, sys.version_info[:3])) in report
    lines = report.splitlines()
    assert any(x.startswith("S-SGD ") and "(baseline)" in x for x in lines)
    assert any(x.startswith("topk-0.01 ") and "S-SGD" in x and "/1" in x for x in lines)
    assert any(x.startswith("time to reach S-SGD's final mean loss") for x in lines)
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"][0]["curve"]) == 2 and res["methods"]["topk-0.01"]["bytes_per_rank_step"] > 0
    assert res["methods"]["topk-0.01"]["bytes_per_rank_step"] < res["methods"]["S-SGD"]["bytes_per_rank_step"] / 10
    assert (out / "convergence.png").stat().st_size > 10_000
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("(reused)") == 2 and "training" not in again.stdout
