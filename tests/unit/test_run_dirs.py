"""Runs never clobber each other (issue 30, item 5), without launching: ``recipes copy`` names the copy after its
file, ``log.dir`` / ``checkpoint.dir`` are used as given, and a run that would start afresh over another run's
records is refused before the process group starts, naming the fixes. The real two-run case is
tests/e2e/test_run_dirs.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ds_ext.trainer.recipe import load_recipe, path_problems, preflight
from ds_ext.trainer.recipe.bundled import main as recipes_main, renamed
from ds_ext.trainer.recipe.preflight import records_problem
from ds_ext.spec import RecipeError

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")


def test_copy_names_the_recipe_after_its_file(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    assert recipes_main(["copy", "quickstart", str(dest)]) == 0
    text = dest.read_text()
    assert "\nname: my\n" in text and "name: quickstart" not in text
    assert text.startswith("# ")  # the leading comment is kept
    out = capsys.readouterr().out
    assert "name: my" in out and "deepspeed --num_gpus 2 --module ds_ext.train --recipe" in out
    assert load_recipe(str(dest)).name == "my"
    assert recipes_main(["copy", "quickstart", str(dest)]) == 2  # an existing file is never replaced
    # a recipe without a name line gets one after its comment; an odd file name is quoted
    assert renamed("# c\nmodel: {name: x}\n", "a b") == '# c\nname: "a b"\nmodel: {name: x}\n'
    assert renamed("name: q  # comment\nx: 1\n", "my-2") == "name: my-2\nx: 1\n"
    assert renamed("model:\n  name: inner\n", "n") == "name: n\nmodel:\n  name: inner\n"  # nested name: untouched


def test_log_dir_is_taken_as_given(tmp_path, monkeypatch, host):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(QUICK, ["log.dir=runs/x"], host)
    assert r.log.dir == str(tmp_path / "runs" / "x")  # not <log_root>/runs/x
    assert r.checkpoint.dir == str(tmp_path / "runs" / "x" / "checkpoints")
    r = load_recipe(QUICK, ["checkpoint.dir=ck"], host)
    assert r.log.dir == str(tmp_path / "logs" / "quickstart")  # the default: under log_root
    assert r.checkpoint.dir == str(tmp_path / "ck")
    assert load_recipe(QUICK, [f"log.dir={tmp_path / 'abs'}"], host).log.dir == str(tmp_path / "abs")


def _records(d: Path, summary: bool = True, history: str = '{"step": 5, "train/loss": 2.3}\n') -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "history.jsonl").write_text(history)
    if summary:
        (d / "summary.json").write_text(json.dumps({"recipe": "/x/quickstart.yaml", "reducer": "allreduce",
                                                    "sync": "none", "steps": 22}))


def test_a_fresh_run_over_another_runs_records_is_refused(tmp_path, host):
    run = tmp_path / "run"
    sets = [f"log.dir={run}"]
    assert records_problem(load_recipe(QUICK, sets, host)) is None  # nothing there yet
    _records(run, summary=False, history="")
    assert records_problem(load_recipe(QUICK, sets, host)) is None  # an empty history is no record
    _records(run)
    r = load_recipe(QUICK, sets, host)
    with pytest.raises(RecipeError) as ei:
        preflight(r, 2)
    msg = str(ei.value)
    assert "log.dir" in msg and f"{run} holds the records (summary.json, history.jsonl)" in msg
    assert "a finished run of quickstart.yaml (reducer=allreduce sync=none, 22 steps)" in msg
    assert f"--set log.dir={run}-2" in msg and "--set log.overwrite=true" in msg
    assert "checkpoint.resume=auto" not in msg  # no checkpoint to continue
    (tmp_path / "run-2").mkdir()
    assert f"--set log.dir={run}-3" in records_problem(r)  # the suggestion does not exist yet
    (run / "summary.json").unlink()
    assert "a run that logged up to step 5" in records_problem(r)  # a run that did not finish
    assert records_problem(load_recipe(QUICK, sets + ["log.overwrite=true"], host)) is None


def test_a_run_resuming_its_checkpoint_continues_its_records(tmp_path, host):
    run = tmp_path / "run"
    _records(run)
    ck = run / "checkpoints" / "step_0000022"
    ck.mkdir(parents=True)
    # auto with no complete checkpoint starts afresh: refused
    assert "no complete checkpoint in" in records_problem(load_recipe(QUICK, [f"log.dir={run}",
                                                                              "checkpoint.resume=auto"], host))
    from ds_ext.trainer.checkpoint import META

    (ck / META).write_text("{}")  # what makes a checkpoint directory complete (ds_ext/trainer/checkpoint/store.py)
    assert records_problem(load_recipe(QUICK, [f"log.dir={run}", "checkpoint.resume=auto"], host)) is None
    assert records_problem(load_recipe(QUICK, [f"log.dir={run}", f"checkpoint.resume={ck}"], host)) is None
    fresh = records_problem(load_recipe(QUICK, [f"log.dir={run}"], host))
    assert "checkpoint.resume=false" in fresh and "continue that run with --set checkpoint.resume=auto" in fresh
    assert [k for k, _ in path_problems(load_recipe(QUICK, [f"log.dir={run}"], host))] == ["log.dir"]


def test_curves_without_matplotlib_is_one_line(tmp_path, monkeypatch, capsys):
    from ds_ext.trainer.records import RunRecords

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setenv("DS_EXT_CURVES", "1")
    rec = RunRecords(True, str(tmp_path))
    rec.history = [{"step": 1, "train/loss": 2.0}]
    rec.curves({"reducer": "allreduce"})
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[ds_ext] no curves.png: matplotlib is not installed; pip install 'ds_ext[plots]' (or pip "
                   "install matplotlib)"]
    assert not (tmp_path / "curves.png").exists()
    RunRecords(False, str(tmp_path)).curves({})  # other ranks: nothing
    monkeypatch.setenv("DS_EXT_CURVES", "0")
    rec.curves({})  # turned off: nothing
    assert capsys.readouterr().err == ""


def test_compare_reads_runs_and_refuses_a_non_run(tmp_path, capsys):
    from ds_ext.trainer.compare import main, read_run, table

    a, b = tmp_path / "a", tmp_path / "b"
    _records(a)
    (a / "summary.json").write_text(json.dumps({"reducer": "powersgd", "sync": "none", "steps": 10, "val_acc": 0.5,
                                                "comm_bytes_total": 2048, "comm_bytes_per_step": 204.8,
                                                "comm_bytes_by_kind": {"powersgd_p": 1024, "powersgd_q": 1024}}))
    b.mkdir()
    (b / "history.jsonl").write_text('{"step": 2, "train/loss": 3.0, "train/samples_per_s": 100}\n{"step": 4, '
                                     '"train/loss": 2.5, "train/samples_per_s": 300, "comm/bytes_total": 4096}\n{"st')
    assert read_run(a).bytes_per_step_by_kind() == {"powersgd_p": 102.4, "powersgd_q": 102.4}
    lines = table([read_run(a), read_run(b)]).splitlines()
    assert lines[0].split() == ["run", "method", "steps", "final", "loss", "val", "acc", "bytes/rank", "bytes/step",
                                "samples/s"]
    assert lines[1].split() == ["a", "powersgd", "10", "2.3000", "0.5000", "2.0", "KiB", "205", "B", "-"]
    assert lines[2].split() == ["b", "?", "4", "2.5000", "-", "4.0", "KiB", "-", "200"]  # a cut line is skipped
    assert main([str(a), str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no history.jsonl or summary.json" in capsys.readouterr().err
    assert main([str(a), str(b), "--labels", "x"]) == 2
