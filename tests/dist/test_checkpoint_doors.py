"""Issue 28, the own loop's door: ``engine.save_checkpoint`` / ``load_checkpoint`` while attached verify every
file against ``meta.json`` on every rank (one verdict), fall back past a damaged checkpoint only on an automatic
resume (``tag=None``) and say so naming the file, refuse it naming the file otherwise, and save a reused tag
atomically. 2 gloo ranks through DeepSpeed (``tests/dist/workers_ckpt.py``); PowerSGD, so a resume that lost
or mixed up the methods' state ends with different parameters. The Hugging Face Trainer's door:
``tests/e2e/test_hf.py``; the trainer's: ``tests/e2e/test_reliability.py``."""
from __future__ import annotations

import pytest
import torch

from tests import harness
from tests.dist import workers_ckpt as W

DAMAGE = ["rank_file_flip", "model_flip", "rank0_over_rank1", "swapped", "rank_files_deleted"]


def _never_silently_different(res, case, mode):
    """Every rank: refused, or ended with the uninterrupted run's parameters."""
    for r, out in enumerate(res):
        got = out[case][mode]
        assert got["error"] is not None or torch.equal(got["params"], out["straight"]), (r, case, mode, got)


def _check(res, case):
    a = res[0][case]
    named = a["named"]
    if case in DAMAGE:  # auto: a named fallback to global_step2, then bit-exact
        for r, out in enumerate(res):
            got = out[case]["auto"]
            assert got["error"] is None and got["step"] == 2, (r, case, got)
            assert torch.equal(got["params"], out["straight"]), (r, case)
        warn = "\n".join(a["auto"]["warnings"])
        assert f"skipping damaged checkpoint global_step4: {named}" in warn, (case, warn)
        assert "global_step2 instead" in warn, warn
        texts = {out[case]["tag"]["error"] for out in res}  # an explicit tag: refused, the same line everywhere
        assert len(texts) == 1 and named in texts.pop(), [out[case]["tag"] for out in res]
        assert {out[case]["tag"]["type"] for out in res} == {"CheckpointError"}
    elif case == "latest_deleted":  # the newest checkpoint with ds_ext state, said once, bit-exact
        for r, out in enumerate(res):
            got = out[case]["auto"]
            assert got["error"] is None and got["step"] == 4 and torch.equal(got["params"], out["straight"]), (r, got)
        warn = "\n".join(a["auto"]["warnings"])
        assert f"{named} is missing; using the newest checkpoint that holds ds_ext state (global_step4)" in warn, warn
    else:  # manifest and rank files deleted: DeepSpeed's model file says ds_ext saved it
        for mode in ("auto", "tag"):
            for out in res:
                assert "was saved with ds_ext attached" in out[case][mode]["error"], out[case][mode]
                assert named in out[case][mode]["error"]
    for mode in ("auto", "tag"):
        if mode in a:
            _never_silently_different(res, case, mode)


def test_own_loop_damaged_model_file_falls_back_bit_exact_or_is_refused(tmp_path):
    """The representative fast case: 16 flipped bytes in the newest checkpoint's model file. Before issue 28
    the own loop loaded it silently (exit 0, parameters NaN)."""
    res = harness.run_pooled(W.own_loop_damage, 2, ckpt=str(tmp_path / "ck"), cases=["model_flip"], timeout=300)
    _check(res, "model_flip")


@pytest.mark.slow
def test_own_loop_damage_matrix(tmp_path):
    """Every damage of the audit on the own loop's door (H1, H2, M4, L7): a bit-flipped ds_ext state file, rank
    0's state over rank 1's, the two swapped, all rank files deleted (with and without ``meta.json``), ``latest``
    deleted."""
    cases = [c for c in DAMAGE if c != "model_flip"] + ["latest_deleted", "manifest_and_rank_files_deleted"]
    res = harness.run_pooled(W.own_loop_damage, 2, ckpt=str(tmp_path / "ck"), cases=cases, timeout=600)
    for case in cases:
        _check(res, case)


def test_a_reused_tag_is_saved_atomically(tmp_path):
    """M3: ``save_checkpoint(dir, tag="last")`` at step 2, then again at step 4 where rank 1's state file cannot
    be written: the save fails on every rank, ``last`` is still the step-2 checkpoint and resumes bit-exact (before,
    the model file was step 4's and the rank files step 2's: refused, nothing usable left). A second save that
    succeeds replaces ``last`` (step 4) and leaves no staging directory behind."""
    res = harness.run_pooled(W.own_loop_fixed_tag, 2, ckpt=str(tmp_path / "ck"), timeout=300)
    for r, out in enumerate(res):
        assert out["save_error"] and "CheckpointSaveError" in out["save_error"], out["save_error"]
        assert "ds_ext_rank1.pt: No space left on device" in out["save_error"]
        got = out["after_failed"]
        assert got["error"] is None and got["step"] == 2, (r, got)
        assert torch.equal(got["params"], out["straight"]), r
        assert out["dir"] == ["last", "latest"], out["dir"]
        assert out["after_second"]["step"] == 4 and out["after_second"]["error"] is None, out["after_second"]
        assert out["dir_second"] == ["last", "latest"], out["dir_second"]


def test_nothing_saved_yet_starts_fresh_but_a_missing_latest_is_not_a_fresh_start(tmp_path):
    """M4's other half: a directory with nothing saved yet (a first run) returns ``(None, None)`` as DeepSpeed
    does; one holding only a checkpoint without ds_ext state and no ``latest`` raises naming the directory
    (before: DeepSpeed's warning and a silent restart from step 0)."""
    ckd = tmp_path / "ck"
    res = harness.run_pooled(W.own_loop_nothing_to_resume, 2, ckpt=str(ckd), timeout=300)
    for out in res:
        assert out["empty"]["error"] is None and out["empty"]["step"] == 0, out["empty"]
        err = out["plain"]["error"]
        assert err and f"{ckd / 'latest'} is missing, and no checkpoint in {ckd} holds ds_ext state" in err, err
