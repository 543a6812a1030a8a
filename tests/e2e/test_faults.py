"""Issue 9, items 2 and 3: a dying rank, atomic checkpoints, refusing a checkpoint from another run.

Kills are real: ``DS_EXT_FAULT=<phase>:<rank>:<step>`` makes that trainer process send itself SIGKILL
at that point (``ds_ext/trainer/faults/``). Ranks run as plain processes (``tests/workers_faults.Ranks``:
nobody kills the survivors for them) or under the deepspeed launcher (as users run it). Every fault
case checks that each survivor exits with code 4 within 60 s of the kill, with a line naming the
lost rank and the step and no traceback, and prints how long that took (``pytest -s`` shows it).

Fast default: a kill in a collective under the launcher, the store host killed in data loading on 3
ranks, the checkpoint writer killed between the rename and ``latest`` followed by a resume (with
changes a resume allows), the refusal of a mismatched checkpoint (method option, optimizer), every
phase of ``checkpoint.save`` interrupted in-process, and the resume-field rules.
Slow: a real kill at every other phase of a save with a resume each time, kills of a non-writer rank
during a save, launcher kills in data loading and in a save, a stuck (SIGSTOPped) rank stopped by
the collective timeout, re-saving a tag that ``latest`` names with the kill between the renames, and
resuming on 1 and 3 ranks from a 2-rank checkpoint.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ds_ext.trainer import checkpoint as ck
from ds_ext.trainer import faults
from tests.e2e import workers_faults as wf

PEER_LOST = faults.EXIT_PEER_LOST
LIMIT_S = 60.0


def report(case: str, seconds: float) -> None:
    print(f"\n[fault timing] {case}: {seconds:.1f} s from the kill to the exit")


def check_survivors(ranks: wf.Ranks, codes, victim: int, step, case: str) -> None:
    """``step``: the step each survivor must name (or a tuple of allowed steps)."""
    steps = step if isinstance(step, tuple) else (step,)
    t_kill = ranks.kill_time()
    assert t_kill is not None, ranks.text(victim)[-3000:]
    assert codes[victim] == -9, (codes, ranks.text(victim)[-3000:])
    for r in range(ranks.world):
        if r == victim:
            continue
        text = ranks.text(r)
        assert codes[r] == PEER_LOST, (r, codes, text[-3000:])
        assert f"[ds_ext] rank {r}: lost rank {victim} (pid " in text, text[-3000:]
        assert any(f" at step {s} (" in text for s in steps), text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        took = ranks.ended[r] - t_kill
        report(f"{case}, rank {r}", took)
        assert took < LIMIT_S


def ckpt_dir(run: Path) -> Path:
    return run / "checkpoints"


def latest_tag(run: Path) -> str:
    return (ckpt_dir(run) / "latest").read_text().strip()


def assert_resumes(run: Path, tmp: Path, expect_from: str, *sets: str, name: str = "resume") -> wf.Ranks:
    """Fresh processes resume from ``latest`` and finish the 8 steps."""
    ranks, codes = wf.run_ranks(2, wf.argv(run, "checkpoint.resume=auto", *sets), tmp / name)
    assert codes == [0, 0], (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    step = int(expect_from.rsplit("_", 1)[1])
    assert f"resumed from {ckpt_dir(run) / expect_from} at step {step}" in ranks.text(0), ranks.text(0)[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert latest_tag(run) == "step_0000008"
    assert [p.name for p in wf.visible_checkpoints(ckpt_dir(run))] == ["step_0000008"]  # keep = 1
    wf.assert_loadable(ckpt_dir(run) / "step_0000008", 2)
    return ranks


# ---- a dying rank -----------------------------------------------------------------------------------

def test_launcher_kill_in_collective_names_rank_and_step(tmp_path):
    """The deepspeed launcher as users run it; rank 1 is killed with its step-3 gradient collective in
    flight. The launcher must return non-zero and rank 0 must have said which rank was lost, when."""
    p, end = wf.launch(2, wf.argv(tmp_path / "run"), fault="collective:1:3")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    m = wf.KILL_TIME.search(out)
    assert m and m.group(1) == "1", out[-3000:]
    assert "[ds_ext] rank 0: lost rank 1 (pid " in out and " at step 3 (" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    report("launcher, collective, rank 1 killed: launcher exit", end - float(m.group(2)))
    assert end - float(m.group(2)) < LIMIT_S


@pytest.mark.slow
def test_store_host_killed_in_data_loading_three_ranks(tmp_path):
    """Rank 0 (which hosts the c10d store and the watchdog) dies while loading step 3's batch; both
    other ranks name it, with nobody (no launcher) stopping them."""
    args = wf.argv(tmp_path / "run", "train.global_batch_size=96")
    ranks, codes = wf.run_ranks(3, args, tmp_path / "logs", fault="data:0:3")
    check_survivors(ranks, codes, victim=0, step=3, case="data, 3 ranks, rank 0 killed")
    assert "(it hosted the rendezvous store and the watchdog)" in ranks.text(1)


def test_writer_killed_between_rename_and_latest_then_resume(tmp_path):
    """Rank 0 dies after renaming step 4 into place and before replacing ``latest``: ``latest`` still
    names step 2, which loads; fresh processes resume from it (changing only fields a resume may
    change), re-save the orphaned step-4 tag and finish."""
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run), tmp_path / "kill", fault="ckpt_rename:0:4")
    check_survivors(ranks, codes, victim=0, step=4, case="ckpt_rename, rank 0 killed")
    assert latest_tag(run) == "step_0000002"
    wf.assert_loadable(ckpt_dir(run) / "step_0000002", 2)
    assert (ckpt_dir(run) / "step_0000004" / ck.META).is_file()  # complete but never pointed at
    assert_resumes(run, tmp_path, "step_0000002", "train.collective_timeout_s=300", "log.every_steps=3",
                   "train.check_consistency_every=1", "checkpoint.keep=1", "name=renamed")


def test_resume_refuses_a_checkpoint_from_another_run(tmp_path):
    """A different method option and learning rate: refused before training with every difference
    named (exit 5), printed once, without a traceback (other world sizes: the slow test below)."""
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run, "train.stop_at_step=2"), tmp_path / "first")
    assert codes == [0, 0], ranks.text(0)[-3000:]
    assert latest_tag(run) == "step_0000002"
    ranks, codes = wf.run_ranks(2, wf.argv(run, "checkpoint.resume=auto", "method.reducer.bucket_mb=1",
                                           "optimizer.lr=0.05"), tmp_path / "other")
    assert codes == [faults.EXIT_CHECKPOINT] * 2, (codes, ranks.text(0)[-3000:])
    out0, out1 = ranks.text(0), ranks.text(1)
    assert "checkpoint error:" in out0 and "cannot resume from" in out0
    assert "method.reducer.bucket_mb: checkpoint has 25.0, this run has 1.0" in out0
    assert "optimizer.lr: checkpoint has 0.1, this run has 0.05" in out0
    assert "cannot resume from" not in out1  # said once
    assert "Traceback" not in out0 + out1
    assert latest_tag(run) == "step_0000002"  # untouched


@pytest.mark.slow
def test_resume_refuses_another_world_size(tmp_path):
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run, "train.stop_at_step=2"), tmp_path / "first")
    assert codes == [0, 0], ranks.text(0)[-3000:]
    ranks, codes = wf.run_ranks(1, wf.argv(run, "checkpoint.resume=auto"), tmp_path / "world1")
    assert codes == [faults.EXIT_CHECKPOINT], ranks.text(0)[-3000:]
    assert "world_size: checkpoint has 2, this run has 1" in ranks.text(0)
    assert "Traceback" not in ranks.text(0)
    ranks, codes = wf.run_ranks(3, wf.argv(run, "checkpoint.resume=auto", "train.global_batch_size=96"),
                                tmp_path / "world3")
    assert codes == [faults.EXIT_CHECKPOINT] * 3, ranks.text(0)[-3000:]
    assert "world_size: checkpoint has 2, this run has 3" in ranks.text(0)
    assert "train.global_batch_size: checkpoint has 64, this run has 96" in ranks.text(0)


# ---- atomic save, in-process (every phase, cheap) -------------------------------------------------

class _Crash(BaseException):
    pass


class FakeEngine:
    """Writes a DeepSpeed-like model-states file; enough for ``checkpoint.save`` without a process group."""

    def __init__(self, step: int):
        self.global_steps = step

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.full((3,), float(self.global_steps))}, "global_steps": self.global_steps},
                   d / "mp_rank_00_model_states.pt")


def _save(root: Path, step: int, keep: int = 1) -> Path:
    return ck.save(FakeEngine(step), str(root), f"step_{step:07d}", {"global_step": step},
                   {"format": ck.FORMAT, "world_size": 1, "recipe": {}}, keep=keep)


def _interrupt_at(monkeypatch, phase: str, step: int):
    def point(p, s):
        if p == phase and s == step:
            raise _Crash(phase)
    monkeypatch.setattr(faults, "point", point)


def _no_partial_visible(root: Path) -> None:
    for d in wf.visible_checkpoints(root):
        wf.assert_loadable(d, 1)  # anything that looks like a checkpoint is a whole one


SAVE_PHASES = {"ckpt_start": 2, "ckpt_deepspeed": 2, "ckpt_rankfile": 2, "ckpt_meta": 2, "ckpt_rename": 2,
               "ckpt_latest": 4, "ckpt_prune": 4, "ckpt_end": 4}  # phase -> the step ``latest`` names after


@pytest.mark.parametrize("phase", list(SAVE_PHASES))
def test_save_interrupted_at_each_phase_in_process(tmp_path, monkeypatch, phase):
    """The file-system state a crash leaves at each phase (an exception stands in for the kill here;
    the real kills are below): ``latest`` names a complete checkpoint, nothing partial looks complete,
    and the next save cleans up and succeeds."""
    root = tmp_path / "ck"
    _save(root, 2)
    _interrupt_at(monkeypatch, phase, 4)
    with pytest.raises(_Crash):
        _save(root, 4)
    want = f"step_{SAVE_PHASES[phase]:07d}"
    assert ck.latest(str(root)) == root / want
    wf.assert_loadable(root / want, 1)
    _no_partial_visible(root)
    _save(root, 6)
    assert ck.latest(str(root)) == root / "step_0000006"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000006"]


@pytest.mark.parametrize("then", ["same_tag", "next_tag"])
def test_resave_of_the_tag_latest_names_interrupted_between_renames(tmp_path, monkeypatch, then):
    """A run resumed from an older checkpoint saves a tag that exists and that ``latest`` names; killed
    after the old copy moved aside and before the new one arrived, ``latest`` still resolves (to the
    old copy), and the next save puts things right."""
    root = tmp_path / "ck"
    _save(root, 2, keep=3)
    _save(root, 4, keep=3)
    _interrupt_at(monkeypatch, "ckpt_replace", 4)
    with pytest.raises(_Crash):
        _save(root, 4, keep=3)
    assert not (root / "step_0000004").exists()
    aside = ck.latest(str(root))
    assert aside == root / ".replaced-step_0000004"
    wf.assert_loadable(aside, 1)
    assert ck.resolve("auto", str(root)) == aside
    monkeypatch.setattr(faults, "point", lambda p, s: None)
    _save(root, 4 if then == "same_tag" else 6, keep=3)
    assert not list(root.glob(".*-*"))
    for d in wf.visible_checkpoints(root):
        wf.assert_loadable(d, 1)
    assert [p.name for p in wf.visible_checkpoints(root)] == (
        ["step_0000002", "step_0000004"] if then == "same_tag" else ["step_0000002", "step_0000004", "step_0000006"])


def test_fault_spec_errors_name_the_variable():
    with pytest.raises(faults.FaultSpecError, match=r"DS_EXT_FAULT='ckpt_nowhere:0:3': expected <phase>"):
        faults.load_fault_plan(0, {"DS_EXT_FAULT": "ckpt_nowhere:0:3"})
    with pytest.raises(faults.FaultSpecError, match="DS_EXT_FAULT='data:x:3'"):
        faults.load_fault_plan(0, {"DS_EXT_FAULT": "data:x:3"})
    faults.load_fault_plan(1, {"DS_EXT_FAULT": "data:0:3"})  # another rank's fault: nothing armed here
    faults.point("data", 3)
    faults.load_fault_plan(0, {})


def test_which_main_thread_errors_count_as_a_failed_collective():
    from ds_ext.deepspeed.step_hooks import DesyncError

    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
            "[127.0.0.1]:5021")  # as raised by a survivor's allreduce here
    assert faults.looks_distributed(RuntimeError(gloo))
    assert faults.looks_distributed(RuntimeError("[../unbound_buffer.cc:78] Timed out waiting 2000ms for recv "
                                                 "operation to complete"))
    assert not faults.looks_distributed(DesyncError("parameters differ between rank 0 and rank 1 at step 3"))
    assert not faults.looks_distributed(ValueError("timeout must be positive"))
    assert not faults.looks_distributed(RuntimeError("CUDA out of memory"))


# ---- what a resume may change -----------------------------------------------------------------------

def _recipe(tmp_path, *sets):
    from ds_ext.trainer.recipe import load_recipe

    return load_recipe(wf.QUICK, [f"log.dir={tmp_path / 'run'}", *sets])


def _meta_dir(tmp_path, recipe, world=2) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / ck.META).write_text(json.dumps(ck.run_meta(recipe, world)))
    return d


@pytest.mark.parametrize("sets", [
    ["train.epochs=20"], ["train.stop_at_step=5"], ["checkpoint.keep=5", "checkpoint.every_steps=7"],
    ["log.every_steps=1", "log.wandb.mode=disabled"], ["train.collective_timeout_s=30"],
    ["train.check_consistency_every=1"], ["data.num_workers=2", "data.eval_micro_batch_size=64"],
    ["train.micro_batch_size=8"], ["name=other", "description=x"], ["method.reducer.bucket_mb=25"],
    ["deepspeed.steps_per_print=5"], ["train.eval_every_epochs=2"],
])
def test_changes_a_resume_allows(tmp_path, sets):
    d = _meta_dir(tmp_path, _recipe(tmp_path))
    ck.check_meta(d, ck.run_meta(_recipe(tmp_path, *sets), 2))


@pytest.mark.parametrize("sets,world,key", [
    ([], 4, "world_size: checkpoint has 2, this run has 4"),
    (["model.width=8"], 2, "model.width: checkpoint has 16, this run has 8"),
    (["model.dropout=0.1"], 2, "model.dropout: checkpoint has 0.0, this run has 0.1"),
    (["data.val_fraction=0.3"], 2, "data.val_fraction: checkpoint has 0.2, this run has 0.3"),
    (["optimizer.momentum=0.5"], 2, "optimizer.momentum: checkpoint has 0.9, this run has 0.5"),
    (["schedule.warmup_epochs=2"], 2, "schedule.warmup_epochs: checkpoint has 1.0, this run has 2.0"),
    (["train.seed=1"], 2, "train.seed: checkpoint has 0, this run has 1"),
    (["train.global_batch_size=128"], 2, "train.global_batch_size: checkpoint has 64, this run has 128"),
    (["train.label_smoothing=0.1"], 2, "train.label_smoothing: checkpoint has 0.0, this run has 0.1"),
    (["method.reducer={name: powersgd}"], 2, "method.reducer.name: checkpoint has 'allreduce', this run has 'powersgd'"),
    (["method.reducer={name: none}", "method.sync={name: local, h: 8}"], 2,
     "method.reducer.name: checkpoint has 'allreduce', this run has 'none'; "
     "method.sync.name: checkpoint has 'none', this run has 'local'. "),  # options of renamed blocks not listed
    (["deepspeed.gradient_clipping=1.0"], 2, "deepspeed.gradient_clipping: checkpoint has (absent), this run has 1.0"),
    (["deepspeed.bf16={enabled: true}"], 2, "precision: checkpoint has 'fp32', this run has 'bf16'"),
])
def test_changes_a_resume_refuses(tmp_path, sets, world, key):
    d = _meta_dir(tmp_path, _recipe(tmp_path))
    with pytest.raises(ck.CheckpointMismatch) as e:
        ck.check_meta(d, ck.run_meta(_recipe(tmp_path, *sets), world))
    assert key in str(e.value)
    assert "Fields that may change on resume: " in str(e.value)


def test_micro_batch_is_fixed_with_dgrab_and_old_checkpoints_are_checked_on_names(tmp_path):
    base = ["train.micro_batch_size=1", "method.order={name: dgrab}"]
    d = _meta_dir(tmp_path, _recipe(tmp_path, *base))
    with pytest.raises(ck.CheckpointMismatch, match="train.micro_batch_size: checkpoint has 1, this run has 2"):
        ck.check_meta(d, ck.run_meta(_recipe(tmp_path, "train.micro_batch_size=2", "method.order={name: dgrab}"), 2))
    # a format-1 meta.json (top-level names only): what it records is still compared
    old = {"world_size": 2, "model": "digits_cnn", "reducer": "allreduce", "sync": "none", "order": "rr",
           "global_batch_size": 64, "precision": "fp32"}
    (d / ck.META).write_text(json.dumps(old))
    ck.check_meta(d, ck.run_meta(_recipe(tmp_path, "optimizer.lr=0.5"), 2))
    with pytest.raises(ck.CheckpointMismatch, match="reducer: checkpoint has 'allreduce', this run has 'topk'"):
        ck.check_meta(d, ck.run_meta(_recipe(tmp_path, "method.reducer={name: topk, density: 0.1}"), 2))


# ---- slow: every other phase with real kills, more launcher cases, a stuck rank ---------------------

SLOW_WRITER_PHASES = {"ckpt_start": "step_0000002", "ckpt_deepspeed": "step_0000002",
                      "ckpt_rankfile": "step_0000002", "ckpt_meta": "step_0000002",
                      "ckpt_latest": "step_0000004", "ckpt_prune": "step_0000004", "ckpt_end": "step_0000004"}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(SLOW_WRITER_PHASES))
def test_writer_killed_at_each_save_phase_then_resume(tmp_path, phase):
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run), tmp_path / "kill", fault=f"{phase}:0:4")
    # after the save's last barrier the survivor may already be in step 5
    check_survivors(ranks, codes, victim=0, step=(4, 5) if phase == "ckpt_end" else 4, case=f"{phase}, rank 0 killed")
    want = SLOW_WRITER_PHASES[phase]
    assert latest_tag(run) == want
    wf.assert_loadable(ckpt_dir(run) / want, 2)
    for d in wf.visible_checkpoints(ckpt_dir(run)):
        wf.assert_loadable(d, 2)
    assert_resumes(run, tmp_path, want)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ckpt_deepspeed", "ckpt_rankfile"])
def test_non_writer_killed_during_save_then_resume(tmp_path, phase):
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run), tmp_path / "kill", fault=f"{phase}:1:4")
    check_survivors(ranks, codes, victim=1, step=4, case=f"{phase}, rank 1 killed")
    assert latest_tag(run) == "step_0000002"
    assert_resumes(run, tmp_path, "step_0000002")


@pytest.mark.slow
@pytest.mark.parametrize("fault,victim,step", [("data:0:3", 0, 3), ("ckpt_meta:0:4", 0, 4), ("ckpt_rankfile:1:4", 1, 4)])
def test_launcher_kill_in_data_and_save(tmp_path, fault, victim, step):
    p, end = wf.launch(2, wf.argv(tmp_path / "run"), fault=fault)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    m = wf.KILL_TIME.search(out)
    assert m and int(m.group(1)) == victim, out[-3000:]
    other = 1 - victim
    assert f"[ds_ext] rank {other}: lost rank {victim} (pid " in out and f" at step {step} (" in out, out[-3000:]
    assert "Traceback" not in out
    report(f"launcher, {fault}: launcher exit", end - float(m.group(2)))
    assert end - float(m.group(2)) < LIMIT_S


@pytest.mark.slow
def test_stuck_rank_is_bounded_by_the_collective_timeout(tmp_path):
    """Rank 1 is SIGSTOPped (alive, sockets open) at its step-3 collective: the watchdog sees nobody die,
    rank 0's collective times out after train.collective_timeout_s = 10 s and it stops, saying so."""
    args = wf.argv(tmp_path / "run", "train.collective_timeout_s=10")
    ranks = wf.Ranks(2, args, tmp_path / "logs", fault="collective:1:3:stop")
    try:
        ended = ranks.procs[0].wait(120)  # raises TimeoutExpired (test fails) if rank 0 hangs
        t_end = time.time()
    finally:
        ranks.kill_all()
    text = ranks.text(0)
    assert ended == PEER_LOST, text[-3000:]
    assert "[ds_ext] rank 0: a collective failed at step 3" in text and "none has died" in text, text[-3000:]
    assert "Traceback" not in text
    took = t_end - ranks.kill_time()
    report("stuck rank 1 (SIGSTOP), timeout 10 s: rank 0", took)
    assert took < LIMIT_S


@pytest.mark.slow
def test_resave_of_latest_tag_killed_between_renames_then_resume(tmp_path):
    """Stop at step 4 (latest = step 4); resume from step 2 by path, which saves step 4 again: killed
    between moving the old step 4 aside and renaming the new one in. ``latest`` (step 4) resolves to
    the old copy, and a resume from it finishes."""
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run, "train.stop_at_step=4", "checkpoint.keep=2"), tmp_path / "first")
    assert codes == [0, 0] and latest_tag(run) == "step_0000004"
    older = ckpt_dir(run) / "step_0000002"
    ranks, codes = wf.run_ranks(2, wf.argv(run, f"checkpoint.resume={older}", "checkpoint.keep=2"),
                                tmp_path / "kill", fault="ckpt_replace:0:4")
    check_survivors(ranks, codes, victim=0, step=4, case="ckpt_replace, rank 0 killed")
    assert latest_tag(run) == "step_0000004" and not (ckpt_dir(run) / "step_0000004").exists()
    assert ck.latest(str(ckpt_dir(run))) == ckpt_dir(run) / ".replaced-step_0000004"
    assert_resumes(run, tmp_path, ".replaced-step_0000004")


@pytest.mark.slow
def test_without_watchdog_a_dead_peer_still_stops_the_others(tmp_path):
    """DS_EXT_WATCHDOG=0 on rank 0 only: the other rank learns there is none (no wait) and, when rank 1
    dies in a collective, rank 0 still stops with exit 4 and one line, but cannot name the rank."""
    ranks = wf.Ranks(2, wf.argv(tmp_path / "run"), tmp_path / "logs", fault="collective:1:3",
                     rank_env={0: {"DS_EXT_WATCHDOG": "0"}})
    codes = ranks.wait_all(300)
    text = ranks.text(0)
    assert codes == [PEER_LOST, -9], (codes, text[-3000:])
    assert "[ds_ext] rank 0: a collective failed at step 3" in text and "its number is unknown" in text, text[-3000:]
    assert "Traceback" not in text
    report("watchdog off, collective, rank 1 killed: rank 0", ranks.ended[0] - ranks.kill_time())
