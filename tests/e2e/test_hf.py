"""Hugging Face ``transformers.Trainer`` with a ds_ext method (``ds_ext/hf.py``, issue 18): 2 processes under
the real ``deepspeed`` launcher on CPU (gloo), the tiny GPT-2 of ``ds_ext/examples/hf_trainer.py`` (2 layers, built from a
config, no download), 6 optimizer steps with gradient accumulation 2, driven by ``tests/e2e/hf_driver.py``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_ext.spec import method_section
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_hf_trainer_runs_the_ds_config_method_and_resumes_it(tmp_path):
    """Ranks end bit-identical in every run; ``allreduce`` from the config's ``ds_ext`` block equals DeepSpeed's
    own reduction (no ``ds_ext`` block) bit for bit, and the meter counts its fp32 gradient every step;
    ``powersgd`` sends fewer bytes; the Trainer's checkpoint holds every rank's ds_ext state next to
    DeepSpeed's files, and a Trainer resumed from it ends bit-identical to the run that went straight
    through (the meter restored too: a resumed run whose methods started fresh would differ)."""
    a, b = _launch(tmp_path, "rank_file_flip")
    for key in ("deepspeed", "allreduce", "powersgd", "resumed"):
        assert torch.equal(a[key]["params"], b[key]["params"]), key
        assert a[key]["global_steps"] == 6, key
    assert torch.equal(a["allreduce"]["params"], a["deepspeed"]["params"])
    assert not torch.equal(a["powersgd"]["params"], a["deepspeed"]["params"])
    numel = a["allreduce"]["params"].numel()
    assert a["allreduce"]["reducer"] == "AllreduceReducer" and a["allreduce"]["by_kind"] == {"allreduce": 6 * 4 * numel}
    ps = a["powersgd"]["by_kind"]
    assert a["powersgd"]["reducer"] == "PowerSGDReducer" and 0 < sum(ps.values()) < 6 * 4 * numel / 4
    assert {"global_step3/ds_ext_rank0.pt", "global_step3/ds_ext_rank1.pt", "latest"} <= set(a["powersgd"]["files"])
    assert torch.equal(a["resumed"]["params"], a["powersgd"]["params"])
    assert a["resumed"]["steps"] == 6 and a["resumed"]["by_kind"] == ps
    _damage_refused(a, b, "rank_file_flip")  # issue 28 H1: was loaded silently (NaN, or blamed on the reducer)


def _launch(out: Path, *cases: str, only_powersgd: bool = False):
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "tests/e2e/hf_driver.py",
                        str(out), *cases] + (["--only-powersgd"] if only_powersgd else []),
                       capture_output=True, text=True, cwd=ROOT, timeout=500,
                       env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _damage_refused(a, b, case: str) -> None:
    """A damaged copy of the Trainer's step-3 checkpoint: ``trainer.train`` raises ``CheckpointError`` on both
    ranks with the same line naming the file (there is no older checkpoint in ``checkpoint-3`` to fall back to)."""
    key = f"case-{case}"
    assert a[key]["error"] == b[key]["error"], (a[key], b[key])
    assert a[key]["type"] == b[key]["type"] == "CheckpointError", (a[key], b[key])
    assert a[key]["named"] in a[key]["error"] and a[key]["params"] is None, a[key]


HF_DAMAGE = ["rank_file_flip", "model_flip", "rank0_over_rank1", "swapped", "rank_files_deleted"]


@pytest.mark.slow
def test_hf_trainer_damage_matrix(tmp_path):
    """Issue 28 on the Hugging Face Trainer's door (``trainer.train(resume_from_checkpoint=...)``): a bit-flipped
    ds_ext state file or model file, rank 0's state over rank 1's, the two swapped, all rank files deleted: refused
    naming the file; ``latest`` deleted: the checkpoint's own ``global_step3`` (a warning says so), bit-exact."""
    a, b = _launch(tmp_path, *HF_DAMAGE, "latest_deleted", only_powersgd=True)
    for case in HF_DAMAGE:
        _damage_refused(a, b, case)
    for out in (a, b):
        got = out["case-latest_deleted"]
        assert got["error"] is None and torch.equal(got["params"], out["powersgd"]["params"]), got
        assert got["steps"] == 6 and got["global_steps"] == 6


def test_what_cannot_run_under_the_trainer_is_refused_with_the_reason():
    from ds_ext.hf import hf_problem

    assert hf_problem(method_section({"reducer": {"name": "powersgd", "rank": 4}})) is None
    msg = hf_problem(method_section({"order": {"name": "dgrab"}}))
    assert "order 'dgrab' cannot run under the Hugging Face Trainer" in msg and "must own the sampler" in msg
    assert "needs the 'cdgrab' order" in hf_problem(method_section({"reducer": "cdgrab"}))
