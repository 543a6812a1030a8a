"""Bad input, by hand: the hand-written refusals the generators of ``tests/e2e/test_fuzz_recipes.py`` do not
reach (deepspeed keys ds_ext reads, files that are not UTF-8 or nested too deeply, missing data files,
unusable log / checkpoint paths, the world size from ``--world-size`` or ``$WORLD_SIZE``), the known gaps
that need an option check in another module (``GAPS``), and ``python -m ds_ext.train --recipe bad.yaml``
subprocesses with the environment the DeepSpeed launcher gives a rank (see the docstring of
``tests/e2e/test_fuzz_recipes.py``, whose helpers this file uses).
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ds_ext.trainer.recipe import (
    DataPathError, RecipeError, data_problems, load_recipe, path_problems, preflight, world_size_from)
from ds_ext.registry import DATASETS
from tests.e2e.test_fuzz_recipes import QUICK, ROOT, base, dump, keys, load, refused, set_path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """As in tests/e2e/test_fuzz_recipes.py: a directory for the files and an empty per-host file (so a
    .config_<hostname>.yml on this machine cannot leak into the cases), with log_root inside the directory."""
    d = tmp_path_factory.mktemp("refusals")
    host = d / "host.yml"
    host.write_text(yaml.safe_dump({"log_root": str(d / "logs")}))
    return d, host


# ---- hand-written cases -----------------------------------------------------------------------------

def _m(**sections):
    """A mutation of base(): dotted key -> value (``None`` values are set as null)."""
    def mutate(d):
        for k, v in sections.items():
            set_path(d, k.replace("__", "."), copy.deepcopy(v))
    return mutate


LOCAL = {"method.reducer": {"name": "none"}, "method.sync": {"name": "local"}}

# id -> (mutation, world or None, expected first key, fragment of the message)
CASES = {
    "int key at top level": (lambda d: d.__setitem__(1, 2), None, "1", "Keys should be strings"),
    "date as a key": (lambda d: d["train"].__setitem__(datetime.date(2024, 1, 1), 3), None, "train.", "strings"),
    "epochs true": (_m(train__epochs=True), None, "train.epochs", "expected a number, got a boolean"),
    "bucket_mb true": (_m(method__reducer={"name": "allreduce", "bucket_mb": True}), None, "method.reducer.bucket_mb",
                       "boolean"),
    "lr .inf": (_m(optimizer__lr=math.inf), None, "optimizer.lr", "finite"),
    "lr 'inf' string": (_m(optimizer__lr="inf"), None, "optimizer.lr", "finite"),
    "timeout .inf": (_m(train__collective_timeout_s=math.inf), None, "train.collective_timeout_s", "finite"),
    "timeout 1e300": (_m(train__collective_timeout_s=1e300), None, "train.collective_timeout_s",
                      "less than or equal to 604800"),
    "seed 2**100": (_m(train__seed=2**100), None, "train.seed", "less than or equal to 2147483647"),
    "seed -1": (_m(train__seed=-1), None, "train.seed", "greater than or equal to 0"),
    "integrity md5": (_m(checkpoint__integrity="md5"), None, "checkpoint.integrity", "'hash', 'size' or 'off'"),
    "on_signal ignore": (_m(checkpoint__on_signal="ignore"), None, "checkpoint.on_signal", "'save' or 'exit'"),
    "max_consecutive_skips -1": (_m(train__max_consecutive_skips=-1), None, "train.max_consecutive_skips",
                                 "greater than or equal to 0"),
    "min_lr above lr": (_m(schedule__min_lr=0.5), None, "schedule.min_lr", "above the peak optimizer.lr"),
    "decay_points decreasing": (_m(schedule__decay_points=[3, 1]), None, "schedule.decay_points", "increasing"),
    "reducer as a string": (_m(method__reducer="allreduce"), None, "method.reducer", "valid dictionary"),
    "train null": (_m(train=None), None, "train", "valid dictionary"),
    "empty model name": (_m(model={"name": ""}), None, "model.name", "unknown model ''"),
    "sync bsp": (_m(method__sync={"name": "bsp"}), None, "method.sync.name", "unknown sync 'bsp'"),
    "resume 5": (_m(checkpoint__resume=5), None, "checkpoint.resume", "valid"),
    "num_workers -1": (_m(data__num_workers=-1), None, "data.num_workers", "greater than or equal to 0"),
    "label_smoothing 1": (_m(train__label_smoothing=1.0), None, "train.label_smoothing", "less than 1"),
    # deepspeed keys ds_ext reads before the engine exists
    "zero_optimization 5": (_m(deepspeed__zero_optimization=5), None, "deepspeed.zero_optimization", "mapping"),
    "zero stage 'x'": (_m(deepspeed__zero_optimization={"stage": "x"}), None, "deepspeed.zero_optimization.stage",
                       "allowed: 0, 1, 2, 3"),
    "zero stage 4": (_m(deepspeed__zero_optimization={"stage": 4}), None, "deepspeed.zero_optimization.stage", "4"),
    "bf16 true": (_m(deepspeed__bf16=True), None, "deepspeed.bf16", "mapping"),
    "fp16 enabled 'yes'": (_m(deepspeed__fp16={"enabled": "yes"}), None, "deepspeed.fp16.enabled", "true, false"),
    "fp16 true with topk": (_m(deepspeed__fp16=True, method__reducer={"name": "topk"}), None, "deepspeed.fp16",
                            "mapping"),
    "fp16 loss_scale -1": (_m(deepspeed__fp16={"enabled": True, "loss_scale": -1}), None, "deepspeed.fp16.loss_scale",
                           ">= 0"),
    "bf16 and fp16": (_m(deepspeed__bf16={"enabled": True}, deepspeed__fp16={"enabled": True}), None,
                      "deepspeed.fp16.enabled", "both enabled"),
    "gradient_clipping 'abc' with local": (_m(deepspeed__gradient_clipping="abc", **LOCAL), None,
                                           "deepspeed.gradient_clipping", "number >= 0"),
    "torch_autocast 5": (_m(deepspeed__torch_autocast=5), None, "deepspeed.torch_autocast", "mapping"),
    # density outside (0, 1], rank <= 0
    "topk density 0": (_m(method__reducer={"name": "topk", "density": 0}), None, "method.reducer.density", "greater"),
    "exdyna density 1.5": (_m(method__reducer={"name": "exdyna", "density": 1.5}), None, "method.reducer.density",
                           "less than or equal to 1"),
    "topk density nan": (_m(method__reducer={"name": "topk", "density": math.nan}), None, "method.reducer.density",
                         "less than or equal to 1"),
    "acpsgd rank -1": (_m(method__reducer={"name": "acpsgd", "rank": -1}), None, "method.reducer.rank", "greater"),
    "powersgd rank 0": (_m(method__reducer={"name": "powersgd", "matrix_approximation_rank": 0}), None,
                        "method.reducer.matrix_approximation_rank", "greater"),
    # world-size rules
    "dssync groups 3 on 4 ranks": (_m(method__sync={"name": "dssync", "groups": 3}, method__reducer={"name": "none"}),
                                   4, "method.sync.groups", "allowed: 1, 2, 4"),
    "dssync pattern repeats a rank": (_m(method__reducer={"name": "none"}, method__sync={
        "name": "dssync", "groups": 2, "grouping": "patterns", "patterns": [[[0, 1], [2, 3]], [[0, 1], [1, 2]]]}),
        4, "method.sync.patterns.1", "into 2 groups of 2"),
    "dssync pattern of 3 groups": (_m(method__reducer={"name": "none"}, method__sync={
        "name": "dssync", "groups": 2, "grouping": "patterns", "patterns": [[[0], [1], [2, 3]]]}),
        4, "method.sync.patterns.0", "into 2 groups"),
    "exdyna 2 blocks on 4 ranks": (_m(method__reducer={"name": "exdyna", "num_blocks": 2}), 4,
                                   "method.reducer.num_blocks", "smaller than the world size 4"),
    "global 96 micro 16 on 4 ranks": (_m(train__global_batch_size=96), 4, "train.global_batch_size", "4 x 16 = 64"),
    # method combinations
    "cdgrab reducer with rr": (_m(method__reducer={"name": "cdgrab"}), None, "method.reducer", "needs order 'cdgrab'"),
    "cdgrab order with allreduce": (_m(method__order={"name": "cdgrab"}), None, "method.order", "allreduce"),
    "local with allreduce": (_m(method__sync={"name": "local"}), None, "method.sync", "must be 'none'"),
    "local with bf16": (_m(deepspeed__bf16={"enabled": True}, **LOCAL), None, "method.sync", "master weights"),
    "local with gradient_clipping": (_m(deepspeed__gradient_clipping=1.0, **LOCAL), None, "method.sync",
                                     "clip_grad_norm"),
    "dssync with deepspeed reducer": (_m(method__reducer={"name": "deepspeed"}, method__sync={"name": "dssync"}),
                                      None, "method.sync", "use reducer 'none'"),
    "postlocal without switch_step": (_m(method__reducer={"name": "allreduce"}, method__sync={
        "name": "local", "period": "postlocal"}), None, "method.sync", "needs switch_step"),
    "qsr without alpha": (_m(method__reducer={"name": "none"}, method__sync={"name": "local", "period": "qsr"}), None,
                          "method.sync", "needs alpha"),
    "h with qsr": (_m(method__reducer={"name": "none"}, method__sync={"name": "local", "period": "qsr", "alpha": 0.1,
                                                                       "h": 3}), None, "method.sync", "do(es) not apply"),
    "signsgd with fp16 dynamic": (_m(method__reducer={"name": "signsgd"}, deepspeed__fp16={"enabled": True}), None,
                                  "method.reducer", "loss_scale"),
    "powersgd with zero 3": (_m(method__reducer={"name": "powersgd"}, deepspeed__zero_optimization={"stage": 3}), None,
                             "deepspeed.zero_optimization.stage", "ZeRO stage 0, 1 or 2"),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=str)
def test_hand_written_case(work, case):
    mutate, world, key, fragment = CASES[case]
    d = base()
    mutate(d)
    err = refused(work, d, world=world)
    assert keys(err)[0].startswith(key), err.problems
    assert fragment in str(err), str(err)


@pytest.mark.parametrize("mutate", [
    _m(method__reducer={"name": "topk", "density": 1.0}),
    _m(method__reducer={"name": "exdyna", "density": 1e-6, "num_blocks": 4}),
    _m(method__reducer={"name": "acpsgd", "rank": 1}),
    _m(method__reducer={"name": "cdgrab"}, method__order={"name": "cdgrab"}),
    _m(method__reducer={"name": "none"}, method__sync={"name": "dssync", "groups": 2, "grouping": "patterns",
                                                       "patterns": [[[0, 3], [1, 2]]]}),
    _m(deepspeed__fp16={"enabled": True, "loss_scale": 128}, method__reducer={"name": "signsgd"}),
    _m(schedule__min_lr=0.1),
    _m(train__seed=2**31 - 1, train__collective_timeout_s=604800, train__max_consecutive_skips=0),
    _m(checkpoint__integrity="off", checkpoint__on_signal="exit"),
], ids=["density 1", "exdyna 4 blocks", "rank 1", "cdgrab pair", "dssync pattern", "signsgd static fp16",
        "min_lr = lr", "max seed, 7-day timeout, no skip limit", "integrity off, exit on signal"])
def test_boundary_cases_are_accepted(work, mutate):
    """The boundaries of the rules above are allowed (the refusals are not over-broad)."""
    d = base()
    mutate(d)
    _, r = load(work, d)
    assert r.check_world(4)


# ---- files, world size, paths -----------------------------------------------------------------------

def test_unusable_files(work, tmp_path):
    assert "not UTF-8" in str(refused(work, raw=b"model: \xff\xfe\n"))
    assert "nested too deeply" in str(refused(work, text="[" * 100_000))
    assert "not valid YAML" in str(refused(work, text="x: !!python/object/apply:os.system ['true']\n"))
    assert "top level must be a mapping" in str(refused(work, text="- 1\n- 2\n"))
    # PyYAML's constructors raise ValueError for these (once a traceback)
    assert "month must be in 1..12" in str(refused(work, text="train: {epochs: 2024-13-45}\n"))
    assert "not valid YAML" in str(refused(work, text="train: {epochs: !!int abc}\n"))
    with pytest.raises(RecipeError, match="is not valid YAML") as ei:
        load_recipe(QUICK, ["train.epochs=2024-13-45"], str(work[1]))
    assert "train.epochs" in str(ei.value)
    err = refused(work, text="")
    assert {"model", "data", "optimizer", "train"} <= set(keys(err))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path, (), str(work[1]))  # a directory


@pytest.mark.parametrize("content, key", [
    ("- /data\n", ""), ("log_root: 5\n", "log_root"), ("data_root: [a]\n", "data_root"), ("log_root: null\n", "log_root"),
], ids=["list", "log_root int", "data_root list", "log_root null"])
def test_bad_host_files(work, tmp_path, content, key):
    host = tmp_path / ".config_h.yml"
    host.write_text(content)
    err = refused(work, base(), host=host)
    assert keys(err)[0] == key


def test_host_file_from_environment(work, tmp_path, monkeypatch):
    rp = work[0] / "r.yaml"
    rp.write_text(dump(base()))
    missing = tmp_path / "absent.yml"
    monkeypatch.setenv("DS_EXT_HOST_CONFIG", str(missing))
    with pytest.raises(RecipeError, match="per-host config file not found") as ei:
        load_recipe(rp)
    assert str(missing) in str(ei.value)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    monkeypatch.setenv("DS_EXT_HOST_CONFIG", str(empty))
    assert load_recipe(rp).log.dir == str(Path("runs/quickstart").absolute())


@pytest.mark.parametrize("explicit, env, expect", [
    (None, {}, None), (None, {"WORLD_SIZE": ""}, None), (None, {"WORLD_SIZE": "4"}, 4), (3, {"WORLD_SIZE": "4"}, 3),
    (0, {}, "--world-size"), (-2, {}, "--world-size"), (None, {"WORLD_SIZE": "two"}, "WORLD_SIZE"),
    (None, {"WORLD_SIZE": "0"}, "WORLD_SIZE"), (None, {"WORLD_SIZE": "-1"}, "WORLD_SIZE"),
])
def test_world_size_from(explicit, env, expect):
    if isinstance(expect, str):
        with pytest.raises(RecipeError, match="positive integer") as ei:
            world_size_from(explicit, env)
        assert expect in str(ei.value)
    else:
        assert world_size_from(explicit, env) == expect


def _cifar10(d, root):
    d["model"] = {"name": "resnet18", "num_classes": 10, "small_input": True}
    d["data"] = {"name": "cifar10"} if root is None else {"name": "cifar10", "root": str(root)}
    return d


def test_missing_data_paths(work, tmp_path):
    """Each case is a DataPathError from preflight (the trainer: 'data error', exit 3) naming the recipe, the
    key and the path; the reader's own message says how to get the data."""
    d, host = work

    def data_refusal(data, host_file=host, name="r.yaml"):
        rp = d / name
        rp.write_text(dump(data))
        r = load_recipe(rp, (), str(host_file))
        with pytest.raises(DataPathError) as ei:
            preflight(r, 2)
        assert str(rp) in str(ei.value)
        return ei.value

    err = data_refusal(_cifar10(base(), tmp_path / "nowhere"))
    assert keys(err) == ["data.root"] and str(tmp_path / "nowhere") in str(err) and "cifar-10-python" in str(err)
    err = data_refusal(_cifar10(base(), None))
    assert keys(err) == ["data.root"] and "no data directory configured" in str(err)
    # all files but one
    sub = tmp_path / "c10" / "cifar-10-batches-py"
    sub.mkdir(parents=True)
    for f in ["data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5", "test_batch"]:
        (sub / f).write_bytes(b"")
    err = data_refusal(_cifar10(base(), tmp_path / "c10"))
    assert str(sub / "data_batch_3") in str(err)
    # data_root from the per-host file: the message names that file and key
    h = tmp_path / ".config_h.yml"
    h.write_text(yaml.safe_dump({"data_root": str(tmp_path / "gone"), "log_root": str(tmp_path / "logs")}))
    err = data_refusal(_cifar10(base(), None), host_file=h)
    assert f"data_root in {h}" in str(err) and str(tmp_path / "gone") in str(err)
    # an absolute file option is named by its own key
    crit = base()
    crit["model"] = {"name": "deepfm", "field_dims": [3] * 39}
    crit["data"] = {"name": "criteo", "file": str(tmp_path / "criteo.txt")}
    err = data_refusal(crit)
    assert keys(err) == ["data.file"] and str(tmp_path / "criteo.txt") in str(err)
    # wikitext2: the chosen validation split
    wt = tmp_path / "wt" / "wikitext-2"
    wt.mkdir(parents=True)
    (wt / "wiki.train.tokens").write_text("a b c\n")
    (wt / "wiki.valid.tokens").write_text("a b c\n")
    lm = base()
    lm["model"] = {"name": "lstm_lm"}
    lm["data"] = {"name": "wikitext2", "root": str(tmp_path / "wt"), "val_split": "test"}
    assert str(wt / "wiki.test.tokens") in str(data_refusal(lm))
    # present files are not refused (the reader decides about their contents later)
    lm["data"]["val_split"] = "valid"
    rp = d / "r.yaml"
    rp.write_text(dump(lm))
    r = load_recipe(rp, (), str(host))
    assert data_problems(r) == [] and path_problems(r) == []
    preflight(r, 2)


def declared_files(name):
    """A reader's ``files(options)`` declaration (what preflight looks for), or None."""
    return getattr(DATASETS.get(name).factory, "files", None)


FILE_BACKED = sorted(n for n in DATASETS.names() if declared_files(n) is not None)


def test_every_file_backed_reader_declares_its_files():
    assert FILE_BACKED == ["cifar10", "cifar100", "criteo", "ffcv_imagenet", "glue_embeddings", "ml20m", "wikitext2"]


@pytest.mark.parametrize("name", [n for n in FILE_BACKED if n != "ffcv_imagenet"])
def test_data_file_table_matches_the_readers(tmp_path, name):
    """A reader's ``files(options)`` (what preflight looks for) names files the reader refuses to start
    without: with each one left out and the others present (empty), the reader's FileNotFoundError names
    exactly that file (so it checks all of them before reading any). Not ``ffcv_imagenet``: its reader opens
    the train .beton before it looks for the val one, and importing ffcv alone takes ~7 s (test_ffcv.py
    covers its missing-file messages)."""
    opts = DATASETS.get(name).options()
    entries = declared_files(name)(opts)
    assert entries
    for skip in range(len(entries)):
        root = tmp_path / f"root{skip}"
        root.mkdir()
        for i, (_, rel) in enumerate(entries):
            if i != skip:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"")
        with pytest.raises(FileNotFoundError) as ei:
            DATASETS.build(name, opts, root=str(root))
        assert str(root / entries[skip][1]) in str(ei.value)


def test_unusable_output_paths(work, tmp_path):
    d, _ = work
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    h = tmp_path / ".config_h.yml"
    h.write_text(yaml.safe_dump({"log_root": str(blocker)}))
    rp = d / "r.yaml"
    rp.write_text(dump(base()))
    r = load_recipe(rp, (), str(h))
    with pytest.raises(RecipeError) as ei:
        preflight(r, 2)
    assert not isinstance(ei.value, DataPathError)
    assert keys(ei.value) == ["log.dir", "checkpoint.dir"] and f"log_root ({blocker}) in {h}" in str(ei.value)
    d2 = base()
    d2["checkpoint"]["resume"] = str(tmp_path / "no_such_checkpoint")
    rp.write_text(dump(d2))
    r = load_recipe(rp, (), str(work[1]))
    with pytest.raises(RecipeError) as ei:
        preflight(r, 2)
    assert keys(ei.value) == ["checkpoint.resume"] and str(tmp_path / "no_such_checkpoint") in str(ei.value)


# ---- known gaps: accepted today, fail only after start-up; each needs an option check elsewhere ---------

GAPS = {
    "wrn depth not 6n+2 (ds_ext/models/wrn.py WRNCifarOptions.depth)": _m(model={"name": "wrn26_10", "depth": 27}),
    "nesterov without momentum (ds_ext/trainer/optim.py SGDOptions)": _m(optimizer={"name": "sgd", "lr": 0.1, "nesterov": True}),
    "adam betas outside [0, 1) (ds_ext/trainer/optim.py AdamOptions.betas)": _m(optimizer={"name": "adam", "lr": 0.1,
                                                                                   "betas": [1.5, 0.9]}),
    "synthetic shape empty (ds_ext/data/digits.py SyntheticOptions.shape)": _m(data={"name": "synthetic", "shape": []}),
    "mlp hidden width 0 (ds_ext/models/small.py MLPOptions.hidden)": _m(model={"name": "mlp", "hidden": [0]}),
}


@pytest.mark.parametrize("gap", sorted(GAPS), ids=str)
def test_component_option_checks(work, gap):
    d = base()
    GAPS[gap](d)
    refused(work, d)


# ---- the trainer itself, as the launcher starts a rank ------------------------------------------------

def _listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def _rank_env(port: int, host: Path, extra=None):
    """What the DeepSpeed launcher gives rank 1 of 2 (no LOCAL_SIZE: DeepSpeed's CPU shm stays off)."""
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               DS_EXT_HOST_CONFIG=str(host), DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    env.pop("LOCAL_SIZE", None)
    env.update(extra or {})
    return env


def _start(recipe: Path, env, *args):
    return subprocess.Popen([sys.executable, "-m", "ds_ext.train", "--recipe", str(recipe), "--local_rank=1", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _watch(proc, lst, timeout=240.0):
    """Block until the child dials ``lst`` or exits (both pipes at EOF), with a deadline; returns
    (connected, stdout, stderr). Both pipes are drained as they fill, so the child never blocks on them;
    a child that connected or outlived the deadline is killed."""
    fds = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}
    open_fds = set(fds)
    deadline = time.monotonic() + timeout
    connected = False
    while open_fds and time.monotonic() < deadline:
        ready = select.select([lst, *open_fds], [], [], max(0.0, deadline - time.monotonic()))[0]
        if lst in ready:
            connected = True
            lst.accept()[0].close()
            break
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                fds[fd] += chunk
            else:
                open_fds.discard(fd)
    if connected or open_fds:
        proc.kill()
    proc.wait()
    connected = connected or select.select([lst], [], [], 0)[0] != []  # a dial that raced the exit
    return connected, fds[proc.stdout.fileno()].decode(errors="replace"), fds[proc.stderr.fileno()].decode(
        errors="replace")


def test_trainer_refuses_before_any_process_group(tmp_path):
    host = tmp_path / "host.yml"
    host.write_text(yaml.safe_dump({"log_root": str(tmp_path / "logs")}))
    bad_host = tmp_path / "bad_host.yml"
    bad_host.write_text("log_root: [1]\n")

    def recipe(name, mutate):
        d = base()
        mutate(d)
        p = tmp_path / f"{name}.yaml"
        p.write_text(dump(d))
        return p

    bomb = recipe("bomb", lambda d: d.pop("deepspeed"))  # 9 levels of 9 aliases: 387 million values expanded
    bomb.write_text(bomb.read_text() + "deepspeed:\n  zero_optimization: {stage: 0}\n  l0: &l0 lol\n" + "".join(
        f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)))

    # name -> (recipe, extra env, exit code, what stderr must hold: the file at fault first, then the key)
    cases = {
        "unknown key": (recipe("unknown", _m(train__epocs=3)), {}, 2, ["unknown.yaml", "train.epocs", "unknown key"]),
        "batch vs WORLD_SIZE": (recipe("batch", lambda d: None), {"WORLD_SIZE": "3"}, 2,
                                ["batch.yaml", "train.global_batch_size", "3 x 16 = 48"]),
        "dssync groups vs WORLD_SIZE": (recipe("dssync", _m(method__reducer={"name": "none"},
                                                            method__sync={"name": "dssync", "groups": 3})),
                                        {}, 2, ["dssync.yaml", "method.sync.groups", "world size 2"]),
        "missing data": (recipe("data", lambda d: _cifar10(d, tmp_path / "no_data")), {}, 3,
                         ["data.yaml", "data error", "data.root", str(tmp_path / "no_data")]),
        "bad WORLD_SIZE": (recipe("world", lambda d: None), {"WORLD_SIZE": "two"}, 2, ["WORLD_SIZE", "'two'"]),
        "bad host file": (recipe("host", lambda d: None), {"DS_EXT_HOST_CONFIG": str(bad_host)}, 2,
                          [str(bad_host), "log_root"]),
        "bad DS_EXT_OPS": (recipe("ops", lambda d: None), {"DS_EXT_OPS": "bogus"}, 2,
                           ["environment: DS_EXT_OPS: 'bogus'", "allowed: auto, compiled, torch"]),
        "YAML alias bomb": (bomb, {}, 2, [f"{bomb}: deepspeed: expands to more than 100,000 values", "YAML aliases"]),
    }
    runs = {}
    try:
        for name, (rp, extra, _, _) in cases.items():  # all at once; each dials its own listener if it gets far
            lst = _listener()
            runs[name] = (lst, _start(rp, _rank_env(lst.getsockname()[1], host, extra)))
        for name, (lst, proc) in runs.items():
            _, _, code, fragments = cases[name]
            connected, out, err = _watch(proc, lst)
            assert not connected, f"{name}: the rank started a process group\n{err[-2000:]}"
            assert proc.returncode == code, (name, proc.returncode, err)
            assert "Traceback" not in out + err, (name, err)
            for f in fragments:
                assert f in err, (name, f, err)
    finally:
        for lst, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            lst.close()


def test_control_valid_recipe_does_start_a_process_group(tmp_path):
    """The same environment with a valid recipe gets to init_distributed and dials the listener: the
    assertion above is one that can fail."""
    host = tmp_path / "host.yml"
    host.write_text(yaml.safe_dump({"log_root": str(tmp_path / "logs")}))
    rp = tmp_path / "ok.yaml"
    rp.write_text(dump(base()))
    lst = _listener()
    try:
        connected, _, err = _watch(_start(rp, _rank_env(lst.getsockname()[1], host)), lst)
    finally:
        lst.close()
    assert connected, err[-3000:]


@pytest.mark.slow
def test_deepspeed_launcher_refuses_world_rule_on_every_rank(tmp_path):
    """Through the real launcher (2 local ranks): the dssync world-size rule stops every rank before
    start-up and the launcher returns the ranks' exit code."""
    d = base()
    d["method"].update(reducer={"name": "none"}, sync={"name": "dssync", "groups": 3})
    d["log"]["dir"] = str(tmp_path / "run")
    rp = tmp_path / "dssync3.yaml"
    rp.write_text(dump(d))
    host = tmp_path / "host.yml"
    host.write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    p = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(port), "--module", "ds_ext.train",
                        "--recipe", str(rp)], capture_output=True, text=True, cwd=ROOT, timeout=240,
                       env=dict(os.environ, DS_ACCELERATOR="cpu", DS_EXT_HOST_CONFIG=str(host)))
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert out.count(f"{rp}: method.sync.groups: groups=3 does not divide the world size 2") == 2, out[-3000:]
    assert "Traceback" not in out
