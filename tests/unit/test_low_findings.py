"""Issue 28, the low findings of the reliability re-audit: each ends in one line with a documented exit code, and
nothing good is lost. In-process, no process group (the trainer's own runs are in
``tests/e2e/test_low_findings.py``):

1. ``summary.json`` is written atomically; a failed write is the reason (exit 7 in the trainer), the old file
   stays whole, and a refused ``history.jsonl`` append leaves no half line;
2. a byte that is not UTF-8 in a ``deepspeed_config`` file: one line naming the file and the byte, exit 2;
3. ``optimizer.lr`` above 1e6 and ``train.collective_timeout_s`` under 1 s refused by ``--check``; ``--check``
   prints the model's parameter count, and a model whose weights exceed the host's memory is refused before
   start-up (and, failing that, its allocation failure at build is one recipe error);
4. labels outside the model's classes are a data error naming the label, the example and the class count;
5. a skipped step whose examples hold non-finite inputs names the data, and so does the divergence it ends in;
6. a non-finite validation loss stops the run with exit 8.
"""
from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

import ds_ext.trainer.loop as loop
from ds_ext.data.base import DataBundle, label_problem, nonfinite_examples, nonfinite_inputs
from ds_ext.trainer import cli, records, setup
from ds_ext.trainer.exit_codes import ExitCode
from ds_ext.trainer.recipe import (
    LR_MAX, RecipeError, load_recipe, model_problems, parameter_count, preflight)

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "recipes" / "quickstart.yaml"



def refusal(overrides, host):
    with pytest.raises(RecipeError) as ei:
        load_recipe(QUICK, overrides, host)
    return str(ei.value)


# ---- 1. summary.json and history.jsonl -------------------------------------------------------------------

def _summary():
    return {"val_acc": 0.5, "val_correct": 1, "val_total": 2, "val_loss": 0.7, "steps": 3, "comm_bytes_per_step": 1.0,
            "train_seconds": 0.1, "skipped_steps": 0}


def test_a_failed_summary_write_keeps_the_old_file_and_says_why(tmp_path, monkeypatch, capsys):
    rec = records.RunRecords(True, str(tmp_path))
    (tmp_path / "summary.json").write_text('{"old": true}')

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records.os, "fsync", full)
    meter = SimpleNamespace(steps=3, total_bytes=3)
    err = rec.summary(_summary(), {"gradient exchange": 3}, meter)
    assert err is not None and "summary.json: No space left on device (errno ENOSPC); " in err, err
    assert (tmp_path / "summary.json").read_text() == '{"old": true}'  # whole, not emptied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left
    out = capsys.readouterr().out
    assert "final: val accuracy 0.5000" in out and "summary not written" in out  # the results still shown
    monkeypatch.undo()
    assert rec.summary(_summary(), {}, meter) is None
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


def test_a_refused_history_append_leaves_no_half_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records._history_append(str(run), {"step": 1, "loss": 1.0})
    before = (run / "history.jsonl").read_bytes()
    full = run / "history.jsonl"
    os.replace(full, run / "kept.jsonl")
    os.symlink("/dev/full", full)  # every write: ENOSPC
    records._history_failed.clear()
    records._history_append(str(run), {"step": 2, "loss": 2.0})  # warns, does not raise
    assert records._history_failed
    os.unlink(full)
    os.replace(run / "kept.jsonl", full)
    assert full.read_bytes() == before


# ---- 2. deepspeed_config not UTF-8 ------------------------------------------------------------------------

def test_a_non_utf8_deepspeed_config_is_one_line_naming_file_and_byte(tmp_path, host, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_bytes(b'{"steps_per_print": 10, "x": "caf\xe9"}')
    line = f"deepspeed_config: {cfg}: not UTF-8 text (invalid continuation byte at byte 33)"
    assert line in refusal([f"deepspeed_config={cfg}"], host)
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host, "--set", f"deepspeed_config={cfg}",
                           "--check"]) == ExitCode.RECIPE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2 and line in err and "Traceback" not in err, err


# ---- 3. values that passed --check and crashed ----------------------------------------------------------

@pytest.mark.parametrize("setting, fragment", [
    ("optimizer.lr=1e300", "optimizer.lr: 1e+300 is outside the allowed range 0 < lr <= 1e+06"),
    ("optimizer.lr=1000001", "optimizer.lr: 1e+06 is outside the allowed range"),
    ("train.collective_timeout_s=1e-9", "train.collective_timeout_s: Input should be greater than or equal to 1"),
    ("train.collective_timeout_s=0.5", "train.collective_timeout_s: Input should be greater than or equal to 1"),
])
def test_bounds_refused_at_check(host, capsys, setting, fragment):
    assert fragment in refusal([setting], host)
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host, "--set", setting, "--check"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.splitlines()) == 2, err


@pytest.mark.parametrize("setting", [f"optimizer.lr={LR_MAX:g}", "train.collective_timeout_s=1"])
def test_bounds_accepted(host, setting):
    load_recipe(QUICK, [setting], host)


def test_check_prints_the_parameter_count_and_warns_of_a_model_too_large(host, capsys):
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host, "--check"]) == 0
    assert "model digits_cnn (width=16, hidden=64, num_classes=10, dropout=0.0): 38,282 parameters " \
           "(149.5 KiB as fp32)" in capsys.readouterr().out
    assert cli.train_main(["--recipe", str(QUICK), "--host-config", host, "--set", "model.width=200000",
                           "--check"]) == 0  # linted perhaps on a smaller machine: a warning here
    got = capsys.readouterr()
    assert "720,412,000,714 parameters (2.6 TiB as fp32)" in got.out
    assert "warning: " in got.err and "the weights alone exceed this host's" in got.err


def test_a_model_too_large_for_the_host_is_refused_before_start_up(host):
    r = load_recipe(QUICK, ["model.width=200000"], host)
    assert parameter_count(r) == 720_412_000_714
    with pytest.raises(RecipeError) as ei:
        preflight(r, 1)
    text = str(ei.value)
    assert "model: model digits_cnn (width=200000, " in text and "exceed this host's" in text, text
    assert len(text.splitlines()) == 1
    small = load_recipe(QUICK, [], host)
    assert model_problems(small, memory=10 ** 6) == [] and model_problems(small, memory=10 ** 5) != []


def test_an_allocation_failure_at_build_is_one_recipe_error(host, monkeypatch):
    r = load_recipe(QUICK, ["model.width=1000"], host)
    t = loop.Trainer.__new__(loop.Trainer)
    t.recipe, t.rank, t.bundle = r, 0, None

    real = loop.MODELS.build

    def oom(*a, **k):
        if torch.empty(0).device.type == "meta":  # the size estimate: shapes only
            return real(*a, **k)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 2880000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(loop.MODELS, "build", oom)
    with pytest.raises(loop._Exit) as ei:
        t._build_model()
    assert ei.value.code == ExitCode.RECIPE
    msg = ei.value.message
    assert msg.startswith("recipe error:\n") and len(msg.splitlines()) == 2, msg
    assert "model digits_cnn (width=1000, " in msg and " parameters (" in msg, msg
    assert "cannot be allocated on rank 0 (can't allocate memory: you tried to allocate 2880000000000 bytes)" in msg


# ---- 4. labels ----------------------------------------------------------------------------------------------

def _bundle(x, y, xv=None, yv=None, classes=2):
    xv = x[:4] if xv is None else xv
    yv = y[:4] if yv is None else yv
    return DataBundle(TensorDataset(x, y), TensorDataset(xv, yv), tuple(x.shape[1:]), classes)


def test_labels_outside_the_models_classes_are_named():
    x, y = torch.randn(20, 8), torch.randint(0, 2, (20,))
    y[13] = 7
    model = torch.nn.Linear(8, 2)
    error, warning = setup.check_data(_bundle(x, y), model)
    assert error == "label 7 of training example 13 is outside the model's 2 classes (allowed labels: 0 to 1)"
    y[13] = 1
    assert setup.check_data(_bundle(x, y), model) == (None, None)
    # the model's classes, not the data set's: a 10-class data set on a 2-class head
    y[5] = 9
    assert "label 9 of training example 5" in setup.check_data(_bundle(x, y, classes=10), model)[0]
    assert setup.check_data(_bundle(x, y, classes=10), torch.nn.Linear(8, 10)) == (None, None)
    assert label_problem(TensorDataset(x, torch.full((20,), -100)), 2, "training") is None  # ignore_index


def test_nonfinite_inputs_at_load():
    x, y = torch.randn(20, 8), torch.randint(0, 2, (20,))
    xv = torch.randn(6, 8)
    xv[3, 1] = float("nan")
    error, _ = setup.check_data(_bundle(x, y, xv=xv, yv=y[:6]), torch.nn.Linear(8, 2))
    assert error == ("1 of 6 validation examples hold non-finite input values (first: validation example 3); "
                     "every validation loss would be nan")
    x[11, 0] = float("inf")
    error, warning = setup.check_data(_bundle(x, y), torch.nn.Linear(8, 2))
    assert error is None and warning.startswith("1 of 20 training examples hold non-finite input values (first: "
                                                "training example 11)")
    assert nonfinite_examples(TensorDataset(x, y)) == (1, 11)
    assert nonfinite_inputs(TensorDataset(x, y), [3, 11, 12]) == [11]


# ---- 5. a skipped step names the data --------------------------------------------------------------------

def _skipping_trainer(x, max_skips=3):
    t = loop.Trainer.__new__(loop.Trainer)
    t.rank, t.micro, t.variable_units = 0, 2, False
    t.recipe = SimpleNamespace(data=SimpleNamespace(name="glue_embeddings"))
    t.bundle = SimpleNamespace(train=TensorDataset(x, torch.zeros(len(x), dtype=torch.long)))
    t.t = SimpleNamespace(max_consecutive_skips=max_skips)
    t.att = SimpleNamespace(skipped_steps=0)
    t.skips_seen, t.skip_streak, t.data_skips = 0, [0, 0], [0, None]
    t.visit = list(range(len(x)))[::-1]  # this epoch's order: microbatch k is visit[2k:2k+2]
    return t


def test_a_skip_on_non_finite_inputs_names_the_data_and_so_does_the_divergence(capsys):
    x = torch.randn(12, 4)
    x[8, 2] = float("nan")  # visited at position 3: microbatch 1, the first step (2 microbatches per step)
    t = _skipping_trainer(x)
    t.step_micro = (0, 2)
    t.att.skipped_steps = 1
    t._count_skips(1)
    err = capsys.readouterr().err
    assert err.strip() == ("[ds_ext] rank 0: step 1: non-finite values in the input batch (data glue_embeddings: "
                           "training example 8), not the learning rate; the optimizer step was skipped")
    with pytest.raises(loop._Exit) as ei:
        for step in (2, 3):
            t.step_micro = (0, 2)
            t.att.skipped_steps += 1
            t._count_skips(step)
    assert ei.value.code == ExitCode.DIVERGED
    msg = ei.value.message
    assert "3 of them drew training examples with non-finite input values on rank 0 (first: training example 8 " \
           "at step 1): the data, not the learning rate" in msg and "Lower optimizer.lr" not in msg, msg
    assert capsys.readouterr().err == ""  # one data line per streak


def test_a_skip_on_finite_inputs_keeps_the_learning_rate_advice():
    t = _skipping_trainer(torch.randn(12, 4), max_skips=1)
    t.step_micro = (0, 2)
    t.att.skipped_steps = 1
    with pytest.raises(loop._Exit) as ei:
        t._count_skips(1)
    assert "Lower optimizer.lr" in ei.value.message


# ---- 6. a non-finite validation loss -----------------------------------------------------------------------

def test_a_nan_validation_loss_stops_with_exit_8(monkeypatch):
    @contextmanager
    def view(module, batches):
        yield

    t = loop.Trainer.__new__(loop.Trainer)
    t.recipe = SimpleNamespace(data=SimpleNamespace(num_workers=0, eval_micro_batch_size=None))
    t.micro, t.rank, t.world, t.bundle = 2, 0, 1, None
    t.order = SimpleNamespace(epoch_indices=lambda e: [])
    module = torch.nn.Linear(2, 2)
    t.engine = SimpleNamespace(global_steps=7, module=module)
    t.att = SimpleNamespace(sync=SimpleNamespace(eval_view=view), comm=None)
    res = {"val_loss": float("nan"), "val_acc": 0.1, "val_correct": 1, "val_total": 10, "val_nonfinite": 10}
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: dict(res))
    with pytest.raises(loop._Exit) as ei:
        t.evaluate(0)
    assert ei.value.code == ExitCode.DIVERGED == 8
    msg = ei.value.message
    assert msg.startswith("[ds_ext] error: training diverged: validation loss nan after epoch 1 (step 7; 10 of 10 "
                          "validation losses non-finite); the parameters are finite") and msg.endswith("(exit 8)")
    assert "\n" not in msg
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(loop._Exit) as ei:
        t.evaluate(0)
    assert "the parameters hold non-finite values" in ei.value.message
    res.update(val_loss=0.5)
    res.pop("val_nonfinite")
    assert t.evaluate(0)["val_loss"] == 0.5
