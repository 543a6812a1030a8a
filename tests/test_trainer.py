"""The trainer end to end on 2 gloo ranks through DeepSpeed: exact resume, launcher runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import harness, workers

ROOT = Path(__file__).resolve().parent.parent
QUICK = str(ROOT / "recipes" / "quickstart.yaml")


def argv(run_dir, *extra):
    return ["--recipe", QUICK, "--set", "train.epochs=2", "--set", f"log.dir={run_dir}",
            "--set", "log.wandb.mode=disabled", "--set", "log.progress=false", "--set", "model.dropout=0.1",
            "--set", "checkpoint.every_epochs=2", "--set", "train.check_consistency_every=1", *extra]


def load_ckpt(run_dir, tag):
    d = Path(run_dir) / "checkpoints" / tag
    states = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = [torch.load(d / f"ds_ext_rank{r}.pt", weights_only=False) for r in range(2)]
    return states, ranks


def assert_tree_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


RESUME_CASES = {
    "allreduce": (["method.reducer={name: allreduce}"], 30),
    # stop right after a P-step (steps 1, 3, ..., 31 are P-steps)
    "acpsgd": (["method.reducer={name: acpsgd, rank: 2, fusion_threshold_mb: 0.05}"], 31),
    "powersgd": (["method.reducer={name: powersgd, matrix_approximation_rank: 2, start_powerSGD_iter: 5}"], 30),
    # Local AdamW + QSR, stopped in the middle of a round (per-rank parameters and Adam moments differ)
    "local_qsr": (["method.reducer={name: none}", "optimizer={name: adamw, lr: 0.003}",
                   "method.sync={name: local, period: qsr, alpha: 0.005, h_base: 3}"], 31),
    "dssync": (["method.reducer={name: none}", "method.sync={name: dssync, groups: 1, h: 4}"], 30),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_mid_epoch_is_bit_exact(tmp_path, case):
    """44 steps straight vs k steps, stop, fresh processes resume from the checkpoint, run to 44.
    Step k is mid-epoch (22 steps/epoch) inside a 2-micro-batch accumulation schedule, with dropout:
    model, optimizer, LR schedule, RNG, meter and method state (per rank) must all be bit-identical."""
    sets, k = RESUME_CASES[case]
    a, b = tmp_path / "a", tmp_path / "b"
    red = tuple(x for s in sets for x in ("--set", s))
    assert harness.run(workers.run_trainer, 2, argv=argv(a, *red)) == [0, 0]
    assert harness.run(workers.run_trainer, 2, argv=argv(b, *red, "--set", f"train.stop_at_step={k}")) == [0, 0]
    assert (b / "checkpoints" / "latest").read_text() == f"step_{k:07d}"
    assert harness.run(workers.run_trainer, 2, argv=argv(b, *red, "--set", "checkpoint.resume=auto")) == [0, 0]
    sa, ra = load_ckpt(a, "step_0000044")
    sb, rb = load_ckpt(b, "step_0000044")
    assert sa["global_steps"] == sb["global_steps"] == 44
    assert_tree_equal(sa["module"], sb["module"], "module")
    assert_tree_equal(sa["optimizer"], sb["optimizer"], "optimizer")
    assert_tree_equal(sa["lr_scheduler"], sb["lr_scheduler"], "lr_scheduler")
    for x, y in zip(ra, rb):
        assert_tree_equal(x["attachment"]["reducer"], y["attachment"]["reducer"], "reducer")
        assert_tree_equal(x["attachment"]["sync"], y["attachment"]["sync"], "sync")
        assert torch.equal(x["rng"]["torch"], y["rng"]["torch"])
        assert x["attachment"]["meter"] == y["attachment"]["meter"]
        assert (x["epoch"], x["step_in_epoch"]) == (y["epoch"], y["step_in_epoch"]) == (2, 0)
    if case in ("local_qsr", "dssync"):  # the save really was in the middle of a round
        _, rk = load_ckpt(b, f"step_{k:07d}")
        assert rk[0]["attachment"]["sync"]["local_steps"] > 0
        assert not torch.equal(rk[0]["attachment"]["sync"]["module"]["0.weight"],
                               rk[1]["attachment"]["sync"]["module"]["0.weight"])
    # and it is not vacuous: the interrupted run's step-30 model differs from the final one
    s30, _ = load_ckpt(b, f"step_{k:07d}")
    assert not torch.equal(s30["module"]["0.weight"], sb["module"]["0.weight"])


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
    import json
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 66
    assert summary["val_acc"] > 0.8  # digits: ~0.9 after 3 epochs (0.97 after the default 8)
    n_params = 16 * 9 + 16 + 32 * 16 * 9 + 32 + 512 * 64 + 64 + 64 * 10 + 10
    assert summary["comm_bytes_total"] == 66 * n_params * 4  # one fp32 gradient per step per rank
    assert (tmp_path / "wandb").is_dir()
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_deepspeed_launcher_refuses_bad_batch_on_every_rank(tmp_path):
    p = _launch("--set", "train.global_batch_size=48", "--set", f"log.dir={tmp_path}", timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "train.global_batch_size: 48 is not divisible by world size x micro batch = 2 x 16 = 32" in out
