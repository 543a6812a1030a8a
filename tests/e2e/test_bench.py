"""The benchmarks still run (tiny settings); their numbers are not asserted -- they are not tests."""
import os
import subprocess
import sys

import pytest

from tests.harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bench_compress_prints_every_row():
    r = _run(["benchmarks.compress", "--model", "digits_cnn", "--rank", "2", "--steps", "2", "--warmup", "1",
              "--hook-input", "1,8,8", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split()[0] for line in r.stdout.splitlines()[1:]]
    assert rows[1:6] == ["copy", "allreduce", "allreduce_view", "powersgd", "acpsgd"], r.stdout
    assert "torch" in rows and "powerSGD_hook" in r.stdout


@pytest.mark.slow
def test_perf_runs_two_ranks_through_deepspeed():
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([os.path.join(bindir, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                        "--module", "benchmarks.perf", "--opt", "acpsgd", "--dnn", "resnet18", "--bs", "2",
                        "--image-size", "32", "--warmup", "1", "--iters", "2", "--batches", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resnet18 acpsgd: iteration time" in r.stdout
