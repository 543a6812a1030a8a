"""Issue 28, the low findings, as the trainer's user meets them: one trainer process (world 1, about 10 s each)
on a tiny ``glue_embeddings`` data set written by the test (8-d inputs, 2 classes, a linear model), damaged the
way the audit damaged it. Each run ends in one line and its documented exit code, without a traceback. The
in-process proofs of every finding are ``tests/unit/test_low_findings.py``."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ds_ext.trainer.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[2]


def data(root: Path, damage=None) -> Path:
    g = torch.Generator().manual_seed(0)
    tr = {"x": torch.randn(200, 8, generator=g)}
    tr["y"] = (tr["x"][:, 0] > 0).long()
    dv = {"x": torch.randn(40, 8, generator=g)}
    dv["y"] = (dv["x"][:, 0] > 0).long()
    if damage:
        damage(tr, dv)
    d = root / "glue-embeddings" / "qqp"
    d.mkdir(parents=True)
    torch.save(tr, d / "train.pt")
    torch.save(dv, d / "dev.pt")
    return root


def run(tmp_path: Path, root: Path, *sets: str, preexec_fn=None) -> subprocess.CompletedProcess:
    recipe = {"name": "tiny", "model": {"name": "linear"}, "data": {"name": "glue_embeddings", "root": str(root)},
              "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 2, "global_batch_size": 16,
                                                                 "micro_batch_size": 8},
              "log": {"dir": str(tmp_path / "run"), "progress": False, "wandb": {"mode": "disabled"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    argv = [sys.executable, "-m", "ds_ext.train", "--recipe", str(tmp_path / "r.yaml")]
    for s in sets:
        argv += ["--set", s]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "DS_EXT_FAULT"):
        env.pop(k, None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def last_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    return p.stderr.strip().splitlines()[-1]


def _small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the kernel refuses writes past 4 KiB (EFBIG)


def test_summary_json_that_cannot_be_written_is_exit_7_and_nothing_is_emptied(tmp_path):
    """Finding 1: the final ``summary.json`` write refused (a full log.dir; here a 4 KiB file-size limit, which
    the history file hits too). Before: an OSError traceback, exit 1, ``summary.json`` left at 0 bytes."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text('{"old": true}')
    # log.overwrite: replacing the earlier run's records on purpose (else the run is refused before it starts)
    p = run(tmp_path, data(tmp_path / "data"), "log.every_steps=1", "log.overwrite=true", preexec_fn=_small_files)
    assert p.returncode == ExitCode.SAVE == 7, p.stderr[-3000:]
    line = last_line(p)
    assert line.startswith("[ds_ext] error: the run finished but its summary could not be written: ") and \
        "summary.json: File too large (errno EFBIG)" in line and line.endswith("(exit 7)"), line
    assert "final: val accuracy" in p.stdout  # the results are shown
    assert (tmp_path / "run" / "summary.json").read_text() == '{"old": true}'  # the previous file, whole
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert lines and [json.loads(ln)["step"] for ln in lines] == list(range(1, len(lines) + 1))  # no half line


def test_a_nan_validation_loss_is_exit_8(tmp_path):
    """Finding 6: one NaN training input with the guard off (``train.nonfinite=off``) makes the parameters NaN;
    the validation loss is nan. Before: ``val loss nan`` and exit 0."""
    def one_nan(tr, dv):
        tr["x"][30, 2] = float("nan")

    p = run(tmp_path, data(tmp_path / "data", one_nan), "train.nonfinite='off'")
    assert p.returncode == ExitCode.DIVERGED == 8, p.stderr[-3000:]
    line = last_line(p)
    assert line.startswith("[ds_ext] error: training diverged: validation loss nan after epoch 1 (step 12; 40 of "
                           "40 validation losses non-finite); the parameters hold non-finite values"), line
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_a_label_outside_the_classes_is_exit_3(tmp_path):
    """Finding 4: label 7 with 2 classes. Before: ``IndexError: Target 7 is out of bounds`` traceback, exit 1."""
    def label_7(tr, dv):
        tr["y"][57] = 7

    p = run(tmp_path, data(tmp_path / "data", label_7))
    assert p.returncode == ExitCode.DATA == 3, p.stderr[-3000:]
    assert last_line(p).endswith("data (glue_embeddings): label 7 of training example 57 is outside the model's 2 "
                                 "classes (allowed labels: 0 to 1)"), p.stderr[-2000:]


@pytest.mark.slow
def test_divergence_on_non_finite_data_names_the_data(tmp_path):
    """Finding 5: NaN in half the training inputs. Before: exit 8 with learning-rate advice only."""
    def half_nan(tr, dv):
        tr["x"][::2, 2] = float("nan")

    p = run(tmp_path, data(tmp_path / "data", half_nan), "train.max_consecutive_skips=4")
    assert p.returncode == ExitCode.DIVERGED, p.stderr[-3000:]
    assert "[ds_ext] rank 0: step 1: non-finite values in the input batch (data glue_embeddings: training " \
           "example " in p.stderr
    line = last_line(p)
    assert "4 of them drew training examples with non-finite input values on rank 0" in line and \
        "the data, not the learning rate" in line and "Lower optimizer.lr" not in line, line
