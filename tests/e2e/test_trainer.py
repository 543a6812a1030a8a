"""The trainer end to end on 2 gloo ranks through DeepSpeed: launcher runs (exact resume: tests/e2e/test_resume_matrix.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import harness

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")


def argv(run_dir, *extra):
    return ["--recipe", QUICK, "--set", "train.epochs=2", "--set", f"log.dir={run_dir}",
            "--set", "log.wandb.mode=disabled", "--set", "log.progress=false", "--set", "model.dropout=0.1",
            "--set", "checkpoint.every_epochs=2", "--set", "train.check_consistency_every=1", *extra]


# Exact resume for every method: tests/e2e/test_resume_matrix.py.


def _launch(*args, timeout=300):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(harness.free_port()), "--module", "ds_ext.train",
           "--recipe", QUICK, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_deepspeed_launcher_trains_and_reports(tmp_path):
    p = _launch("--set", "train.epochs=3", "--set", f"log.dir={tmp_path}", "--set", "log.wandb.mode=offline")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "[ds_ext] final: val accuracy" in out and "communicated" in out
    # what runs, in the first lines (issue 30): the method's own line, once (rank 0)
    assert out.count("[ds_ext] allreduce: every gradient averaged exactly, no compression (8 tensors in ") == 1, out
    # the end: the attachment's summary by kind, then the wandb run and how to upload it; no FutureWarning for
    # ds_ext's control all_gather (ds_ext/deepspeed/compat.py)
    assert "[ds_ext] ds_ext (allreduce, order rr): " in out and "per rank over 66 steps" in out
    lines = p.stdout.splitlines()
    last = next(i for i, x in enumerate(lines) if x.startswith("[ds_ext] wandb run quickstart (id "))
    assert last > next(i for i, x in enumerate(lines) if x.startswith("[ds_ext] final: val accuracy"))
    assert f": offline; upload it with: wandb sync {tmp_path}/wandb/offline-run-" in lines[last], lines[last]
    assert "FutureWarning" not in out, out
    import json
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 66
    assert summary["val_acc"] > 0.8  # digits: ~0.9 after 3 epochs (0.97 after the default 8)
    n_params = 16 * 9 + 16 + 32 * 16 * 9 + 32 + 512 * 64 + 64 + 64 * 10 + 10
    assert summary["comm_bytes_total"] == 66 * n_params * 4  # one fp32 gradient per step per rank
    assert (tmp_path / "wandb").is_dir()
    assert (tmp_path / "checkpoints" / "latest").is_file()


# Slow (fast-suite budget): the same batch rule's refusal, with the launcher's environment and before any process
# group, is the fast tests/e2e/test_recipe_refusals.py::test_trainer_refuses_before_any_process_group ("batch vs
# WORLD_SIZE"); the launcher door itself stays fast in test_deepspeed_launcher_trains_and_reports above.
@pytest.mark.slow
def test_deepspeed_launcher_refuses_bad_batch_on_every_rank(tmp_path):
    p = _launch("--set", "train.global_batch_size=48", "--set", f"log.dir={tmp_path}", timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "train.global_batch_size: 48 is not divisible by world size x micro batch = 2 x 16 = 32" in out


def test_runs_without_a_launcher_as_world_size_1(tmp_path):
    """``python -m ds_ext.train --recipe R`` with no launcher variables (how people debug): rank 0 of a
    world of 1, not a crash in DeepSpeed's MPI discovery (``mpi4py``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    p = subprocess.run([sys.executable, "-m", "ds_ext.train", "--recipe", QUICK, "--set", "train.epochs=1",
                        "--set", f"log.dir={tmp_path}", "--set", "log.wandb.mode=disabled",
                        "--set", "log.progress=false"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "world 1," in out and "[ds_ext] final: val accuracy" in out
    assert "mpi4py" not in out
    # nothing was communicated, and the run says so instead of a payload no network carried (issue 30, item 9),
    # naming the launcher command for data parallel at the start and as its last line
    hint = ("[ds_ext] world size 1: nothing communicated (the methods run, their collectives are skipped); for data "
            "parallel start every process with the launcher: deepspeed --num_gpus 2 --module ds_ext.train --recipe "
            "quickstart")
    assert out.count(hint) == 2 and p.stdout.rstrip().splitlines()[-1] == hint, out
    assert "[ds_ext] ds_ext (allreduce, order rr): nothing communicated (world size 1) over 22 steps" in out
    import json

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["comm_bytes_total"] == 0 and s["comm_bytes_by_kind"] == {} and s["world_size"] == 1
