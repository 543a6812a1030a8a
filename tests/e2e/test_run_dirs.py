"""Runs never clobber each other, and pictures of them (issue 30, items 5 and 6), with two real 2-rank runs
through the trainer (gloo, DeepSpeed): ``recipes copy quickstart my.yaml`` runs into ``<log_root>/my``; a second,
different run of the same copy is refused before it starts and leaves the first run's records byte for byte;
run in its own ``log.dir`` it trains; each run directory ends with a ``curves.png``; ``ds-ext compare`` draws
both into one PNG and prints their table."""
from __future__ import annotations

import json

from tests import harness
from tests.dist import workers

PNG = b"\x89PNG\r\n\x1a\n"


def _argv(recipe, host, *sets):
    base = ["train.epochs=1", "train.steps_per_epoch=4", "log.every_steps=1", "log.wandb.mode=disabled",
            "log.progress=false", "checkpoint.every_epochs=0", *sets]
    return ["--recipe", str(recipe), "--host-config", host, *[a for s in base for a in ("--set", s)]]


def test_copy_run_twice_then_compare(tmp_path, host, capsys, monkeypatch):
    from ds_ext.trainer.cli import main

    monkeypatch.setenv("DS_EXT_CURVES", "1")  # tests/conftest.py turns the pictures off for every other run
    recipe = tmp_path / "my.yaml"
    assert main(["recipes", "copy", "quickstart", str(recipe)]) == 0
    first = tmp_path / "logs" / "my"  # log_root (the host file) / the copy's name
    assert harness.run(workers.run_trainer, 2, argv=_argv(recipe, host)) == [0, 0]
    records = {f: (first / f).read_bytes() for f in ("summary.json", "history.jsonl", "curves.png")}
    assert records["curves.png"].startswith(PNG)
    assert json.loads(records["summary.json"])["reducer"] == "allreduce"

    powersgd = "method.reducer={name: powersgd, rank: 2, start_powerSGD_iter: 0}"
    capsys.readouterr()
    assert main(["train", *_argv(recipe, host, powersgd)]) == 2  # refused before any process group
    err = capsys.readouterr().err
    assert f"log.dir: {first} holds the records (summary.json, history.jsonl) of a finished run of my.yaml" in err
    assert "--set log.overwrite=true" in err and f"--set log.dir={first}-2" in err
    assert {f: (first / f).read_bytes() for f in records} == records  # the first run's records intact

    second = tmp_path / "logs" / "my-2"
    assert harness.run(workers.run_trainer, 2, argv=_argv(recipe, host, powersgd, f"log.dir={second}")) == [0, 0]
    assert json.loads((second / "summary.json").read_text())["reducer"] == "powersgd"
    assert (second / "curves.png").read_bytes().startswith(PNG)

    out = tmp_path / "cmp.png"
    assert main(["compare", str(first), str(second), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 20_000
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run", "method"]
    assert lines[1].split()[:3] == ["my", "allreduce", "4"] and lines[2].split()[:3] == ["my-2", "powersgd", "4"]
    assert lines[-1] == f"wrote {out}"
