"""The one command line ``ds-ext`` (``ds_ext/trainer/cli.py``): every subcommand answers ``--help`` as a
process (``python -m ds_ext.trainer.cli <sub> --help``) and runs one cheap real call; ``train`` as a process
with a finished run (its ``os._exit(0)`` path), the others in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_ext.trainer import cli
from ds_ext.trainer.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run([sys.executable, "-m", "ds_ext.trainer.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_every_subcommand_answers_help():
    """The usage (0 with --help; 2 without a subcommand or with an unknown one)."""
    p = _run("--help", timeout=120)
    assert p.returncode == 0, p.stderr
    for name in cli.SUBCOMMANDS:
        assert f"  {name} " in p.stdout
    p = _run(timeout=120)
    assert p.returncode == 2 and "subcommands:" in p.stderr
    p = _run("nonsense", timeout=120)
    assert p.returncode == 2 and "unknown subcommand 'nonsense'" in p.stderr


@pytest.mark.parametrize("sub", sorted(cli.SUBCOMMANDS))
def test_subcommand_help_as_a_process(sub):
    p = _run(sub, "--help", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "usage:" in p.stdout
    if sub in ("train", "check"):
        assert "exit codes:" in p.stdout and " 75  saved a checkpoint" in p.stdout


def test_train_runs_and_finishes(tmp_path):
    p = _run("train", "--recipe", QUICK, "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
             "--set", f"log.dir={tmp_path}", "--set", "log.wandb.mode=disabled", "--set", "log.progress=false")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "world 1," in out and "[ds_ext] final: val accuracy" in out
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_check(capsys):
    assert cli.main(["check", "--recipe", QUICK, "--world-size", "2"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert cli.main(["check", "--recipe", QUICK, "--set", "train.global_batch_size=48", "--world-size", "2"]) == \
        ExitCode.RECIPE
    assert "not divisible" in capsys.readouterr().err


def test_recipes_methods_report(capsys):
    assert cli.main(["recipes", "show", "no-such-recipe"]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
    assert cli.main(["methods", "list"]) == 0
    assert "powersgd" in capsys.readouterr().out
    assert cli.main(["report"]) == 0
    assert capsys.readouterr().out.strip()


def test_schedule(capsys):
    args = ["schedule", "--recipe", QUICK, "--world-size", "2", "--steps-per-epoch", "22",
            "--set", "method.reducer={name: none}",
            "--set", "method.sync={name: local, period: qsr, alpha: 0.5, h_base: 4}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "sync=local period:" in out and "sync rounds" in out
    assert cli.main(args + ["--csv"]) == 0
    assert capsys.readouterr().out.startswith("round,first_step,H,lr,data_parallel\n0,0,")
    assert cli.main(["schedule", "--recipe", QUICK]) == 0  # allreduce: nothing on a period
    assert "not averaged on a period" in capsys.readouterr().out


def test_costmodel(capsys):
    assert cli.main(["costmodel", "--methods", "allreduce,powersgd", "--model", "digits_cnn", "--gpus", "8",
                     "--bandwidth", "10", "--png", ""]) == 0
    out = capsys.readouterr().out
    assert "allreduce" in out and "powersgd" in out
