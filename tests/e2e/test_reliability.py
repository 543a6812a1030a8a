"""Issue 16: no silent data loss. Each case in the form a user meets it, with real trainer processes
(2 ranks, gloo, the quickstart recipe): a file damaged or removed, a second job started, a signal
sent, the learning rate set to diverge, a write that the operating system refuses. For each: the exit
code, the one line, and that the previous good checkpoint still loads and resumes to the same
parameters as an uninterrupted run (bit for bit, as ``tests/e2e/test_resume_matrix.py`` compares).

One uninterrupted 12-step run (a checkpoint every 2 steps, all kept) is the reference and the source of
every damaged copy (module fixture). A rank is held at a known step by ``DS_EXT_FAULT=<phase>:<rank>:
<step>:stop`` (it SIGSTOPs itself; the test blocks in ``waitpid(WUNTRACED)`` until it has), then gets
its signal. Nothing sleeps. The in-process cases at the end (candidates, fallback rules, pruning
order, fingerprints) need no process group.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

from ds_ext.trainer import checkpoint as ck
from ds_ext.trainer import faults
from tests import harness
from tests.e2e import workers_faults as wf

STEPS = 12


def args(run: Path, *sets: str):
    return wf.argv(run, "checkpoint.keep=10", *sets, steps=STEPS)


def tag(step: int) -> str:
    return f"step_{step:07d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: step_2 ... step_12 all kept."""
    run = tmp_path_factory.mktemp("reference") / "run"
    ranks, codes = wf.run_ranks(2, args(run), run.parent / "logs")
    assert codes == [0, 0], ranks.text(0)[-3000:]
    assert [p.name for p in wf.visible_checkpoints(run / "checkpoints")] == [tag(s) for s in range(2, 13, 2)]
    return run


def copy_upto(reference: Path, dest: Path, last: int) -> Path:
    """A run directory holding the reference's checkpoints up to step ``last``, ``latest`` naming it."""
    ckd = dest / "checkpoints"
    ckd.mkdir(parents=True)
    for p in wf.visible_checkpoints(reference / "checkpoints"):
        if ck.step_of(p.name) <= last:
            shutil.copytree(p, ckd / p.name)
    (ckd / "latest").write_text(tag(last))
    return ckd


def same_as_reference(reference: Path, run: Path) -> None:
    sa, ra = harness.load_ckpt(reference, tag(STEPS))
    sb, rb = harness.load_ckpt(run, tag(STEPS))
    for key in ("module", "optimizer", "lr_scheduler"):
        harness.assert_tree_equal(sa[key], sb[key], key)
    for x, y in zip(ra, rb):
        harness.assert_tree_equal(x, y, "rank state")


def flip(path: Path, n: int = 400) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def no_traceback(ranks: wf.Ranks) -> None:
    for r in range(ranks.world):
        text = ranks.text(r)
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]


def resume_ok(run: Path, tmp: Path, name: str, *sets: str) -> wf.Ranks:
    ranks, codes = wf.run_ranks(2, args(run, "checkpoint.resume=auto", *sets), tmp / name)
    assert codes == [0, 0], (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    no_traceback(ranks)
    return ranks


# ---- 1. resume never goes backwards -------------------------------------------------------------------

def test_latest_deleted_resumes_from_newest_complete(reference, tmp_path):
    """The audit's data-loss case: ``latest`` removed. ``resume: auto`` takes the newest complete
    checkpoint (saying so), not step 0, and ends where the uninterrupted run ended."""
    run = tmp_path / "run"
    ckd = copy_upto(reference, run, 6)
    (ckd / "latest").unlink()
    ranks = resume_ok(run, tmp_path, "resume")
    out = ranks.text(0)
    assert f"{ckd / 'latest'} is missing; using the newest complete checkpoint instead" in out, out[-3000:]
    assert f"resumed from {ckd / tag(6)} at step 6" in out
    same_as_reference(reference, run)
    for s in (2, 4):  # the earlier checkpoints survived the restarted run's saves (keep 10)
        wf.assert_loadable(ckd / tag(s), 2)


def test_damaged_newest_falls_back_with_auto_and_stops_with_a_path(reference, tmp_path):
    """400 flipped bytes in step 6's model file. ``auto``: a warning naming the file, resume from step
    4, same end as the uninterrupted run. The explicit path: exit 5 on both ranks naming the file, said
    once, no traceback; step 4 still loads."""
    run = tmp_path / "run"
    ckd = copy_upto(reference, run, 6)
    bad = ckd / tag(6) / "mp_rank_00_model_states.pt"
    flip(bad)
    ranks, codes = wf.run_ranks(2, args(run, f"checkpoint.resume={ckd / tag(6)}"), tmp_path / "explicit")
    assert codes == [faults.EXIT_CHECKPOINT] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    out = ranks.text(0)
    assert f"{bad}: SHA-256 differs from the one recorded at save (damaged)" in out, out[-3000:]
    assert "SHA-256" not in ranks.text(1)  # one message
    no_traceback(ranks)
    wf.assert_loadable(ckd / tag(4), 2)
    ranks = resume_ok(run, tmp_path, "auto")
    out = ranks.text(0)
    assert f"skipping damaged checkpoint {tag(6)}: {bad}: SHA-256 differs" in out, out[-3000:]
    assert f"resumed from {ckd / tag(4)} at step 4" in out
    same_as_reference(reference, run)


@pytest.mark.parametrize("case", ["meta_without_files", pytest.param("meta_empty", marks=pytest.mark.slow)])
def test_a_manifest_without_its_fingerprints_is_damaged_not_unverified(reference, tmp_path, case):
    """M1: step 6's ``meta.json`` without its ``files`` entry (and step 6's model file bit-flipped, which that
    used to let through: ``val loss nan``, exit 0), or ``meta.json`` = ``{}`` (was reported as "made by another
    run", exit 5): ``resume: auto`` skips step 6 naming ``meta.json`` and ends as the uninterrupted run."""
    run = tmp_path / "run"
    ckd = copy_upto(reference, run, 6)
    meta = ckd / tag(6) / ck.META
    if case == "meta_without_files":
        body = json.loads(meta.read_text())
        del body["files"]
        meta.write_text(json.dumps(body))
        flip(ckd / tag(6) / "mp_rank_00_model_states.pt")
        want = f"skipping damaged checkpoint {tag(6)}: {meta}: its 'files' entry"
    else:
        meta.write_text("{}")
        want = f"skipping damaged checkpoint {tag(6)}: {meta}: no 'format' entry"
    ranks = resume_ok(run, tmp_path, "auto")
    out = ranks.text(0)
    assert want in out, out[-3000:]
    assert f"resumed from {ckd / tag(4)} at step 4" in out and "made by" not in out
    same_as_reference(reference, run)


@pytest.mark.parametrize("case", ["stale_rank_file", "swapped_rank_file", "meta_not_an_object"] + [
    pytest.param(c, marks=pytest.mark.slow) for c in ("truncated_deepspeed_file", "latest_not_utf8", "latest_outside")])
def test_damaged_files_end_in_exit_5_naming_the_file(reference, tmp_path, case):
    """Explicit checkpoint (or ``latest``) with no fallback, ``integrity: off`` where the damage would
    otherwise be caught by the fingerprints, so that the deeper check is the one that speaks."""
    run = tmp_path / "run"
    ckd = copy_upto(reference, run, 6)
    target, sets = ckd / tag(6), ["checkpoint.integrity=off"]
    if case == "stale_rank_file":  # rank 1's file from step 4: ranks would train at different data positions
        shutil.copy(ckd / tag(4) / "ds_ext_rank1.pt", target / "ds_ext_rank1.pt")
        want = f"{target / 'ds_ext_rank1.pt'} is from step 4, DeepSpeed's files in {target} from step 6"
    elif case == "swapped_rank_file":  # rank 0's file copied over rank 1's: that rank's method state
        shutil.copy(target / "ds_ext_rank0.pt", target / "ds_ext_rank1.pt")
        want = f"{target / 'ds_ext_rank1.pt'} records rank 0, this is rank 1"
    elif case == "meta_not_an_object":
        (target / ck.META).write_text("[]")
        want = f"{target / ck.META}: not a JSON object"
    elif case == "truncated_deepspeed_file":
        f = target / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:1000])
        want = f"{target}: DeepSpeed could not load its files"
    elif case == "latest_not_utf8":
        (ckd / "latest").write_bytes(b"\xff\xfe step")
        target, want = ckd, f"{ckd / 'latest'}: not UTF-8 text (damaged)"
    else:
        (ckd / "latest").write_text("../../elsewhere/" + tag(6))
        target, want = ckd, "which is not a checkpoint of"
    ranks, codes = wf.run_ranks(2, args(run, f"checkpoint.resume={target}", *sets), tmp_path / "logs")
    assert codes == [faults.EXIT_CHECKPOINT] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    assert want in ranks.text(0), ranks.text(0)[-3000:]
    assert "resumed from" not in ranks.text(0)
    no_traceback(ranks)
    wf.assert_loadable(ckd / tag(4), 2)


# ---- 4. one job per directory -------------------------------------------------------------------------

# Slow (fast-suite budget): the fast test below refuses job B the same way (exit 6 naming A's rank-0 pid, no
# traceback, A's files untouched) in the harder case, lock files deleted; the message with the lock file present
# ("started ...") is the fast in-process test_directory_lock_names_the_holder_and_is_released /
# test_directory_lock_holds_after_its_lock_file_is_deleted.
@pytest.mark.slow
def test_second_job_on_the_same_directory_is_refused(tmp_path):
    """Job A is held at step 3 (its rank 0 stopped, alive); job B on the same run directory is refused
    before training with exit 6 naming A's rank-0 pid; A's files are untouched by B."""
    run = tmp_path / "run"
    a = wf.Ranks(2, args(run), tmp_path / "a", fault="data:0:3:stop")
    try:
        a.wait_stopped(0)
        ranks, codes = wf.run_ranks(2, args(run, "checkpoint.resume=auto"), tmp_path / "b")
        assert codes == [ck.EXIT_BUSY] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
        out = ranks.text(0)
        assert f"is in use by another job (pid {a.procs[0].pid} on " in out, out[-3000:]
        assert "started " in out
        no_traceback(ranks)
        assert (run / "checkpoints" / "latest").read_text() == tag(2)  # A's first save, untouched
    finally:
        a.kill_all()


def test_second_job_after_the_lock_files_were_deleted_is_refused(tmp_path):
    """Issue 28 M2: the lock file left by every run looks stale; a user deletes it (here while job A runs,
    held at step 3). Job B on the same directory is still refused with exit 6 naming A's rank-0 pid (the
    directory itself is locked), and A, released, puts its lock file back at its next save and ends as an
    undisturbed run does."""
    run = tmp_path / "run"
    a = wf.Ranks(2, args(run), tmp_path / "a", fault="data:0:3:stop")
    try:
        a.wait_stopped(0)
        for f in (run / ck.LOCK, run / "checkpoints" / ck.LOCK):
            f.unlink()
        ranks, codes = wf.run_ranks(2, args(run, "checkpoint.resume=auto"), tmp_path / "b")
        assert codes == [ck.EXIT_BUSY] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
        out = ranks.text(0)
        assert f"is in use by another job (pid {a.procs[0].pid} on " in out, out[-3000:]
        no_traceback(ranks)
        assert (run / "checkpoints" / "latest").read_text() == tag(2)  # A's first save, untouched by B
        a.procs[0].send_signal(signal.SIGCONT)
        codes = a.wait_all(300)
        assert codes == [0, 0], (codes, a.text(0)[-3000:])
        assert "lock file" in a.text(0) and "was deleted" in a.text(0), a.text(0)[-3000:]
        assert (run / "checkpoints" / ck.LOCK).exists() and (run / ck.LOCK).exists()
        assert (run / "checkpoints" / "latest").read_text() == tag(STEPS)
    finally:
        a.kill_all()


# ---- 5. save failures -----------------------------------------------------------------------------------

def _small_files():
    """The kernel refuses writes past 200 KB in this process (EFBIG; Python ignores SIGXFSZ):
    a checkpoint file that does not fit fails as a full disk does."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_failed_save_stops_with_one_line_and_keeps_the_previous_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    copy_upto(reference, run, 2)
    # the model file of a later checkpoint would exceed the limit: make the earlier one small enough to copy
    size = (reference / "checkpoints" / tag(2) / "mp_rank_00_model_states.pt").stat().st_size
    assert size > 200_000, size  # the limit must bite on the save
    ranks = wf.Ranks(2, args(run, "checkpoint.resume=auto"), tmp_path / "logs", preexec_fn=_small_files)
    codes = ranks.wait_all(120)
    assert codes == [ck.EXIT_SAVE] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    out = ranks.text(0)
    assert "checkpoint save failed at step 4: " in out and "File too large (errno EFBIG)" in out, out[-3000:]
    assert " free on that file system; the previous checkpoint " in out and tag(2) in out
    no_traceback(ranks)
    ckd = run / "checkpoints"
    assert (ckd / "latest").read_text() == tag(2)
    assert [p.name for p in wf.visible_checkpoints(ckd)] == [tag(2)] and not list(ckd.glob(".staging-*"))
    resume_ok(run, tmp_path, "resume")
    same_as_reference(reference, run)


# ---- 6. preemption ----------------------------------------------------------------------------------------

def test_sigusr1_saves_on_every_rank_and_the_resume_matches(reference, tmp_path):
    """Slurm's ``--signal=USR1``: rank 1 alone gets SIGUSR1 during step 5; both ranks finish that step,
    save step 5 and exit 75; the resume ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    ranks = wf.Ranks(2, args(run), tmp_path / "first", fault="data:1:5:stop")
    try:
        ranks.wait_stopped(1)
        os.kill(ranks.procs[1].pid, signal.SIGUSR1)
        os.kill(ranks.procs[1].pid, signal.SIGCONT)
        codes = ranks.wait_all(120)
    finally:
        ranks.kill_all()
    assert codes == [faults.EXIT_PREEMPTED] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    out = ranks.text(0)
    assert f"stopped at step 5 on a signal to another rank (checkpoint.on_signal=save); saved " in out, out[-3000:]
    assert "SIGUSR1 at step 5" in ranks.text(1), ranks.text(1)[-3000:]
    no_traceback(ranks)
    assert (run / "checkpoints" / "latest").read_text() == tag(5)
    ranks = resume_ok(run, tmp_path, "resume")
    assert f"resumed from {run / 'checkpoints' / tag(5)} at step 5" in ranks.text(0)
    same_as_reference(reference, run)


@pytest.mark.slow
def test_ctrl_c_saves_without_tracebacks(tmp_path):
    """SIGINT to both ranks (a terminal's Ctrl-C reaches the whole process group): the same save and
    exit 75, no KeyboardInterrupt from inside a collective."""
    run = tmp_path / "run"
    ranks = wf.Ranks(2, args(run), tmp_path / "first", fault="data:0:3:stop")
    try:
        ranks.wait_stopped(0)
        for p in ranks.procs:
            os.kill(p.pid, signal.SIGINT)
        os.kill(ranks.procs[0].pid, signal.SIGCONT)
        codes = ranks.wait_all(120)
    finally:
        ranks.kill_all()
    assert codes == [faults.EXIT_PREEMPTED] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    no_traceback(ranks)
    wf.assert_loadable(run / "checkpoints" / (run / "checkpoints" / "latest").read_text(), 2)


# ---- 7. divergence ----------------------------------------------------------------------------------------

def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e6: the loss explodes within a few steps, then every gradient is non-finite. The run stops
    after ``max_consecutive_skips`` skipped steps with exit 8 and one message; no checkpoint is written
    during the skips, so ``latest`` still names one saved before them, and it loads."""
    run = tmp_path / "run"
    ranks, codes = wf.run_ranks(2, wf.argv(run, "optimizer.lr=1e6", "train.max_consecutive_skips=4",
                                           "checkpoint.every_steps=1", "checkpoint.keep=1", steps=40),
                                tmp_path / "logs")
    assert codes == [faults.EXIT_DIVERGED] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    out = ranks.text(0)
    assert "training diverged: 4 optimizer steps in a row" in out and "train.max_consecutive_skips=4" in out, out[-3000:]
    assert out.count("training diverged") == 1 and "training diverged" not in ranks.text(1)
    assert "checkpoint not saved: the last 1 optimizer step(s) were skipped" in out
    no_traceback(ranks)
    last = (run / "checkpoints" / "latest").read_text()
    wf.assert_loadable(run / "checkpoints" / last, 2)
    summary_step = ck.step_of(last)
    st = torch.load(run / "checkpoints" / last / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in st["module"].values())
    assert f"last finite step {summary_step}" in out


# ---- in-process: choosing, verifying, pruning ------------------------------------------------------------

class FakeEngine:
    def __init__(self, step: int):
        self.global_steps = step

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.arange(1000.0) * self.global_steps}, d / "mp_rank_00_model_states.pt")


def _save(root: Path, step: int, keep: int = 10, integrity: str = "hash") -> Path:
    return ck.save(FakeEngine(step), str(root), tag(step), {}, {"format": ck.FORMAT, "world_size": 1, "recipe": {}},
                   keep=keep, integrity=integrity)


@pytest.mark.parametrize("latest,note", [
    (None, "is missing; using the newest complete checkpoint instead"),
    (b"", "is empty; using the newest"),
    (b"\xff\xfe", "not UTF-8 text (damaged); using the newest"),
    (b"../other/step_0000004", "(a path, not a tag); using the newest"),
    (b"step_0000099", "points at 'step_0000099', which is missing or incomplete"),
])
def test_an_unusable_latest_falls_back_to_the_newest_complete(tmp_path, latest, note):
    root = tmp_path / "ck"
    for s in (2, 4, 6):
        _save(root, s)
    (root / tag(6) / ck.META).unlink()  # step 6 incomplete: never a candidate
    if latest is None:
        (root / "latest").unlink()
    else:
        (root / "latest").write_bytes(latest)
    notes = []
    assert ck.choose("auto", str(root), warn=notes.append) == root / tag(4)
    assert len(notes) == 1 and note in notes[0], notes
    with pytest.raises(ck.CheckpointError):  # an explicit directory never falls back
        ck.choose(str(root), str(root))


def test_nothing_to_fall_back_to_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    assert ck.choose("auto", str(root)) is None  # an empty directory: a first run
    (root / "latest").write_text(tag(4))
    with pytest.raises(ck.CheckpointError, match="holds no complete checkpoint to fall back to"):
        ck.choose("auto", str(root))


def test_latest_names_an_older_checkpoint_so_newer_ones_are_not_candidates(tmp_path):
    """A save that died between its rename and ``latest`` leaves a complete newer checkpoint that no one
    pointed at: ``latest`` wins (its run went on from there), and only older ones are fallbacks."""
    root = tmp_path / "ck"
    for s in (2, 4, 6):
        _save(root, s)
    (root / "latest").write_text(tag(4))
    paths, fallback, _ = ck.candidates("auto", str(root))
    assert paths == [root / tag(4), root / tag(2)] and fallback


@pytest.mark.parametrize("integrity,damage,caught", [
    ("hash", "flip", "SHA-256 differs"), ("size", "flip", None), ("off", "truncate", None),
    ("size", "truncate", "bytes, the checkpoint recorded"), ("hash", "remove", "missing"),
])
def test_fingerprints(tmp_path, integrity, damage, caught):
    root = tmp_path / "ck"
    p = _save(root, 2, integrity="hash")
    meta = json.loads((p / ck.META).read_text())
    f = p / "mp_rank_00_model_states.pt"
    assert meta["files"][f.name]["size"] == f.stat().st_size and len(meta["files"][f.name]["sha256"]) == 64
    assert set(meta["files"]) == {f.name, "ds_ext_rank0.pt"} and meta["step"] == 2
    {"flip": lambda: flip(f, 40), "truncate": lambda: f.write_bytes(f.read_bytes()[:100]), "remove": f.unlink}[damage]()
    got = ck.verify(p, integrity)
    assert (got is None) if caught is None else (caught in got and str(f) in got), got


@pytest.mark.parametrize("edit,says", [
    (lambda m: {}, "no 'format' entry"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, "its 'files' entry"),
    (lambda m: {**m, "files": {}}, "its 'files' entry"),
    (lambda m: {k: v for k, v in m.items() if k != "format"}, "no 'format' entry"),
    (lambda m: {k: v for k, v in m.items() if k != "recipe"}, "no 'recipe' entry"),
    (lambda m: {k: v for k, v in m.items() if k != "step"}, "no valid 'step' entry"),
    (lambda m: {**m, "files": {k: v for k, v in m["files"].items() if not k.startswith("ds_ext_rank")}},
     "lists no ds_ext_rank0.pt"),
    (lambda m: {**m, "format": 2}, "predates fingerprints"),
])
def test_an_incomplete_manifest_is_damaged_and_auto_falls_back(tmp_path, edit, says):
    """The one rule for every door (``ds_ext/deepspeed/checkpoint.py``: ``manifest_problem``): a ``meta.json``
    missing what a format-3 save always writes is damaged, so ``auto`` takes the older intact checkpoint and an
    explicit path is refused naming ``meta.json``; never "unverified", never "made by another run"."""
    root = tmp_path / "ck"
    for s in (2, 4):
        _save(root, s)
    meta = root / tag(4) / ck.META
    meta.write_text(json.dumps(edit(json.loads(meta.read_text()))))
    notes = []
    assert ck.choose("auto", str(root), warn=notes.append) == root / tag(2)
    assert f"skipping damaged checkpoint {tag(4)}: {meta}: " in notes[0] and says in notes[0], notes
    with pytest.raises(ck.CheckpointError) as ei:
        ck.choose(str(root / tag(4)), str(root))
    assert str(ei.value).startswith(f"{meta}: ") and says in str(ei.value), ei.value


def test_size_only_checkpoints_record_no_hash(tmp_path):
    p = _save(tmp_path / "ck", 2, integrity="size")
    files = json.loads((p / ck.META).read_text())["files"]
    assert all(set(v) == {"size"} for v in files.values())


def test_prune_orders_by_step_number_past_ten_million(tmp_path):
    """Names sort ``step_10000000`` before ``step_9999998``; pruning must go by the number."""
    root = tmp_path / "ck"
    for s in (9_999_998, 9_999_999, 10_000_000):
        _save(root, s, keep=2)
    assert [p.name for p in wf.visible_checkpoints(root)] == [tag(10_000_000), tag(9_999_999)]


def test_a_run_resumed_from_an_older_checkpoint_never_prunes_newer_ones(tmp_path):
    root = tmp_path / "ck"
    for s in (2, 4, 6, 8):
        _save(root, s, keep=2)
    assert [p.name for p in wf.visible_checkpoints(root)] == [tag(6), tag(8)]
    _save(root, 4, keep=1)  # resumed from an older one by path, saving step 4 again
    assert {p.name for p in wf.visible_checkpoints(root)} == {tag(4), tag(6), tag(8)}
    assert ck.latest(str(root)) == root / tag(4)


def test_directory_lock_names_the_holder_and_is_released(tmp_path):
    job = ck.job_identity()
    held = ck.lock_dirs([tmp_path / "run", tmp_path / "run" / "checkpoints"], job)
    # another open file description (as another process would have) cannot take it
    with pytest.raises(ck.DirectoryBusy, match=rf"in use by another job \(pid {os.getpid()} on "):
        ck.DirLock.acquire(tmp_path / "run" / "checkpoints", job)
    for h in held:
        h.release()
    ck.DirLock.acquire(tmp_path / "run" / "checkpoints", job).release()


def test_directory_lock_holds_after_its_lock_file_is_deleted(tmp_path):
    """Issue 28 M2, without DeepSpeed: another process holds the lock; its lock file deleted, a second acquire
    is still refused (the directory itself is locked), naming the holder's pid; the holder's ``verify`` (at
    its next save) puts the file back with its identity and a warning."""
    import subprocess
    import sys

    d = tmp_path / "run"
    code = ("import logging, sys\nlogging.basicConfig(format='%(levelname)s %(message)s')\n"
            "from ds_ext.trainer import checkpoint as ck\n"
            f"held = ck.lock_dirs([{str(d)!r}], ck.job_identity())\nprint('ready', flush=True)\n"
            "sys.stdin.readline()\nck.verify_all(held)\nprint('verified', flush=True)\nsys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(wf.ROOT)})
    try:
        assert child.stdout.readline().strip() == "ready"
        (d / ck.LOCK).unlink()
        with pytest.raises(ck.DirectoryBusy, match=rf"in use by another job \(pid {child.pid} on "):
            ck.DirLock.acquire(d, ck.job_identity())
        assert not (d / ck.LOCK).exists()  # a refused job creates no lock file
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "verified"
        assert json.loads((d / ck.LOCK).read_text())["pid"] == child.pid  # put back, naming its holder
        with pytest.raises(ck.DirectoryBusy, match=rf"pid {child.pid} on .*started "):
            ck.DirLock.acquire(d, ck.job_identity())
    finally:
        child.stdin.close()
        assert child.wait(60) == 0
    err = child.stderr.read()
    assert f"the lock file {d / ck.LOCK} was deleted" in err and "directory lock was held throughout" in err, err
    ck.DirLock.acquire(d, ck.job_identity()).release()  # the kernel released it with its holder


@pytest.mark.slow
def test_disk_full_during_save_real_tmpfs(reference, tmp_path):
    """A real full disk (a tmpfs with room for one checkpoint; root only): exit 7 naming ENOSPC and the
    free space, step 2 intact, and the resume (after the user made room) ends as the uninterrupted run."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    one = sum(f.stat().st_size for f in (reference / "checkpoints" / tag(2)).iterdir())
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={one + 150_000}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = tmp_path / "run"
        ckd = copy_upto(reference, mnt, 2)
        ranks, codes = wf.run_ranks(2, args(run, f"checkpoint.dir={ckd}", "checkpoint.resume=auto"), tmp_path / "full")
        assert codes == [ck.EXIT_SAVE] * 2, (codes, ranks.text(0)[-3000:], ranks.text(1)[-3000:])
        out = ranks.text(0)
        assert "checkpoint save failed at step 4: " in out and "No space left on device (errno ENOSPC)" in out, out[-3000:]
        assert " free on that file system; the previous checkpoint " in out
        no_traceback(ranks)
        assert (ckd / "latest").read_text() == tag(2) and not list(ckd.glob(".staging-*"))
        wf.assert_loadable(ckd / tag(2), 2)
        shutil.copytree(ckd, run / "checkpoints")  # the user moves the checkpoints to a bigger disk
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    resume_ok(run, tmp_path, "resume")
    same_as_reference(reference, run)
