"""One owner of the per-rank state file (``ds_ext/deepspeed/checkpoint.py``), through both routes: an own
loop's ``engine.save_checkpoint`` / ``load_checkpoint`` while attached, and the trainer's store. 2 gloo ranks
through DeepSpeed (own loops: the session's rank pool, ``tests/harness.py``'s ``run_pooled``: they keep the process
group and restore what they change; the trainer: fresh processes, ``tests/e2e/workers_faults.py``)."""
from __future__ import annotations

import json
from pathlib import Path

from ds_ext.trainer import checkpoint as ck
from ds_ext.trainer import faults
from tests import harness
from tests.dist import workers
from tests.e2e import workers_faults as wf


def test_own_loop_checkpoint_is_complete_and_the_trainer_refuses_it_in_one_line(tmp_path):
    """An own loop's save writes ``meta.json`` with every file's size and SHA-256 (so the trainer finds it
    complete and intact), and ``saved_by``; the trainer, resuming from it, stops with exit 5 and one line
    saying why (no recipe, no data position), not "incomplete". A swapped rank file (rank 0's copied over
    rank 1's) is refused on the own-loop route with ``CheckpointError`` on both ranks, naming the file."""
    run = tmp_path / "run"
    ckd = run / "checkpoints"
    a, b = harness.run_pooled(workers.own_loop_save_and_swap, 2, trainer_dir=str(ckd), swap_dir=str(tmp_path / "swap"),
                              timeout=300)
    meta = json.loads((ckd / "mid" / ck.META).read_text())
    assert meta["saved_by"] == ck.OWN_LOOP and meta["step"] == 2 and meta["world_size"] == 2, meta
    assert {"ds_ext_rank0.pt", "ds_ext_rank1.pt", "mp_rank_00_model_states.pt"} <= set(meta["files"])
    assert all(len(v["sha256"]) == 64 for v in meta["files"].values())
    assert (ckd / "latest").read_text() == "mid"
    assert ck.choose("auto", str(ckd)) == ckd / "mid"  # complete and intact for the trainer
    for out in (a, b):
        assert out["is_checkpoint_error"] and out["type"] == "CheckpointError", out
    swap = tmp_path / "swap" / "t"
    assert f"{swap / 'ds_ext_rank1.pt'}: SHA-256 differs from the one recorded at save" in b["error"], b["error"]
    assert a["error"] == b["error"]  # one verdict, said alike on every rank

    ranks, codes = wf.run_ranks(2, wf.argv(run, "checkpoint.resume=auto"), tmp_path / "logs")
    assert codes == [faults.EXIT_CHECKPOINT] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    out = ranks.text(0)
    assert f"cannot resume from {ckd / 'mid'}: it was saved by engine.save_checkpoint in an own training loop" \
        in out, out[-3000:]
    assert "incomplete" not in out and "Traceback" not in out and "resumed from" not in out


def test_an_own_loop_loads_a_trainer_checkpoint(tmp_path):
    """The trainer saves step 4 (quickstart, 2 ranks); an own loop with the same recipe's engine and methods
    loads it with ``engine.load_checkpoint`` (``latest``): DeepSpeed's module and every rank's method state
    are the checkpoint's, bit for bit."""
    run = tmp_path / "run"
    args = wf.argv(run, steps=4)
    ranks, codes = wf.run_ranks(2, args, tmp_path / "logs")
    assert codes == [0, 0], ranks.text(0)[-3000:]
    sets = [a for a in args[2:] if a != "--set"]
    res = harness.run_pooled(workers.own_loop_loads_trainer_checkpoint, 2, sets=sets,
                             ckpt_dir=str(run / "checkpoints"), timeout=300)
    states, files = harness.load_ckpt(run, "step_0000004")
    for r, out in enumerate(res):
        assert out["global_steps"] == 4 and Path(out["path"]).parent.name == "step_0000004", out["path"]
        harness.assert_tree_equal(out["attachment"], files[r]["attachment"], f"rank {r} attachment")
        harness.assert_tree_equal(out["module"], states["module"], "module")
