"""Library logging (issue 18, item 4): the library logs through the ``ds_ext`` logger, which a user can
silence or route; the trainer shows it as ``[ds_ext] <message>`` lines (``ds_ext.trainer.loop.console_logging``).
Also the wandb logger's run name and run id file, the step-time window and the history carried across
resumes, at unit level (no processes; the real runs: tests/e2e/test_run_records.py)."""
from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from ds_ext import meter
from ds_ext.trainer import records
from ds_ext.deepspeed.attach import NonFiniteGuard
from ds_ext.trainer.loop import ConsoleHandler, _history_start, console_logging, run_name

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")


@pytest.fixture
def clean_logger():
    """The ``ds_ext`` logger as a fresh process has it (no handlers, no level, propagating), put back after."""
    lg = logging.getLogger("ds_ext")
    saved = (lg.handlers[:], lg.level, lg.propagate, lg.disabled)
    lg.handlers[:] = []
    lg.setLevel(logging.NOTSET)
    lg.propagate, lg.disabled = True, False
    yield lg
    lg.handlers[:] = saved[0]
    lg.setLevel(saved[1])
    lg.propagate, lg.disabled = saved[2], saved[3]


def skip_event(step: int = 3, ranks=(1,)) -> None:
    """A NonFiniteGuard skip event from a unit-level call (no engine, no process group): a library warning."""
    guard = NonFiniteGuard(None, [], types.SimpleNamespace(global_rank=0), mode="skip")
    guard._skip_event(step, list(ranks), shared=True, report=True)
    assert guard.skipped_steps == 1


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_library_warnings_go_to_the_ds_ext_logger_and_can_be_silenced(clean_logger, caplog):
    with caplog.at_level(logging.WARNING, logger="ds_ext"):
        skip_event(3, [1])
    got = [r for r in caplog.records if r.name.startswith("ds_ext")]
    assert len(got) == 1 and got[0].levelno == logging.WARNING
    assert "step 3: non-finite gradient on rank(s) [1]" in got[0].getMessage()

    caplog.clear()
    clean_logger.setLevel(logging.CRITICAL)  # the user silences the library
    skip_event()
    assert not [r for r in caplog.records if r.name.startswith("ds_ext")]


def test_a_user_can_route_the_library_elsewhere(clean_logger, capsys):
    mine = Collect()
    clean_logger.addHandler(mine)
    clean_logger.propagate = False
    with console_logging() as handler:  # configured by the user: the trainer leaves it alone
        assert handler is None
        skip_event(4, [0])
    assert clean_logger.handlers == [mine] and clean_logger.propagate is False
    assert [r.getMessage()[:7] for r in mine.records] == ["step 4:"]
    assert capsys.readouterr().err == ""


def test_trainer_console_format_once_and_restored(clean_logger, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    root = logging.getLogger()
    on_root = Collect()
    root.addHandler(on_root)  # e.g. DeepSpeed's or the user's root handler: must not print these again
    try:
        with console_logging() as handler:
            assert isinstance(handler, ConsoleHandler) and clean_logger.propagate is False
            skip_event(5, [0, 1])
            logging.getLogger("ds_ext.data.criteo").info("criteo: 9 rows from x (8 train); field_dims=[3]")
            logging.getLogger("ds_ext.hierarchy").info("hierarchical: an INFO the trainer did not print")
            logging.getLogger("ds_ext.deepspeed.attach").debug("debug: never shown")
    finally:
        root.removeHandler(on_root)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("[ds_ext] step 5: non-finite gradient on rank(s) [0, 1]")
    assert err[1] == "[ds_ext] criteo: 9 rows from x (8 train); field_dims=[3]"
    assert on_root.records == []
    # put back: no handler, no level, propagating again (main() may run in-process)
    assert clean_logger.handlers == [] and clean_logger.level == logging.NOTSET and clean_logger.propagate


def test_trainer_console_shows_warnings_only_on_other_ranks(clean_logger, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with console_logging():
        logging.getLogger("ds_ext.data.criteo").info("criteo: rank 0 says this")
        logging.getLogger("ds_ext.trainer.checkpoint").warning("a warning on rank 1")
    assert capsys.readouterr().err.splitlines() == ["[ds_ext] a warning on rank 1"]


def test_trainer_console_keeps_a_level_the_user_set(clean_logger, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    clean_logger.setLevel(logging.CRITICAL)
    with console_logging():
        skip_event()
        logging.getLogger("ds_ext.data.criteo").info("criteo: silenced")
    assert capsys.readouterr().err == ""
    assert clean_logger.level == logging.CRITICAL


def test_criteo_reader_line_reaches_the_trainer_console(clean_logger, capsys, monkeypatch, tmp_path):
    from ds_ext.registry import DATASETS, load_builtin
    from tests.unit.test_models_data import _criteo_lines

    load_builtin()
    monkeypatch.setenv("RANK", "0")
    d = tmp_path / "criteo"
    d.mkdir()
    (d / "train.txt").write_text("\n".join(_criteo_lines()) + "\n")
    with console_logging():
        DATASETS.build("criteo", {"min_count": 2, "cache": False}, root=str(tmp_path))
    err = capsys.readouterr().err.splitlines()
    want = f"[ds_ext] criteo: 10 rows from {d / 'train.txt'} (9 train); field_dims=[3, "
    assert len(err) == 1 and err[0].startswith(want), err


# ---- wandb logger (a stand-in wandb module: no service process, no network) -----------------------------

class FakeWandb(types.ModuleType):
    def __init__(self, fail_modes=()):
        super().__init__("wandb")
        self.calls, self.fail_modes = [], set(fail_modes)
        self.Settings = lambda **kw: kw

    def init(self, mode, **kw):
        self.calls.append({"mode": mode, **kw})
        if mode in self.fail_modes:
            raise TimeoutError("no network")
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None, id=kw["id"])


def cfg(**kw):
    from ds_ext.trainer.recipe import WandbSection

    return WandbSection(**kw)


def test_wandb_run_name_and_id_persist_for_resumed_runs(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    a = records.WandbLogger(cfg(mode="offline"), str(tmp_path), {}, enabled=True, name="quickstart")
    rid = (tmp_path / records.RUN_ID_FILE).read_text().strip()
    assert a.run_id == rid and fake.calls[-1]["id"] == rid and fake.calls[-1]["resume"] == "allow"
    assert fake.calls[-1]["name"] == "quickstart" and fake.calls[-1]["mode"] == "offline"
    records.WandbLogger(cfg(mode="offline", name="mine"), str(tmp_path), {}, enabled=True, name="quickstart",
                        resume=True)
    assert fake.calls[-1]["id"] == rid and fake.calls[-1]["name"] == "mine"  # log.wandb.name wins
    records.WandbLogger(cfg(mode="offline"), str(tmp_path), {}, enabled=True, resume=False)  # a fresh run
    fresh = (tmp_path / records.RUN_ID_FILE).read_text().strip()
    assert fresh != rid and fake.calls[-1]["id"] == fresh
    assert not records.WandbLogger(cfg(mode="offline"), str(tmp_path), {}, enabled=False).run  # not rank 0
    assert len(fake.calls) == 3


def test_wandb_disabled_imports_nothing_and_online_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would raise
    off = records.WandbLogger(cfg(mode="disabled"), str(tmp_path / "d"), {}, enabled=True)
    assert off.run is None and not (tmp_path / "d").exists()
    fake = FakeWandb(fail_modes={"online"})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with caplog.at_level(logging.WARNING, logger="ds_ext"):
        records.WandbLogger(cfg(mode="online"), str(tmp_path), {}, enabled=True, name="q")
    assert [c["mode"] for c in fake.calls] == ["online", "offline"] and fake.calls[0]["id"] == fake.calls[1]["id"]
    assert [r.name for r in caplog.records] == ["ds_ext.trainer.records"]
    assert "wandb online init failed (no network); logging offline instead" in caplog.records[0].getMessage()


def test_run_name_from_the_recipe(tmp_path):
    from ds_ext.trainer.recipe import load_recipe

    base = ["log.dir=" + str(tmp_path)]
    assert run_name(load_recipe(QUICK, base)) == "quickstart"
    assert run_name(load_recipe(QUICK, base + ["log.wandb.name=explicit"])) == "explicit"
    other = tmp_path / "my_recipe.yaml"
    other.write_text(Path(QUICK).read_text().replace("name: quickstart\n", ""))
    assert run_name(load_recipe(str(other), base)) == "my_recipe"


# ---- step-time window and history ----------------------------------------------------------------

def test_step_window_uses_host_time_and_leaves_out_pauses(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(records.time, "perf_counter", lambda: clock[0])
    w = records.StepWindow()
    for _ in range(4):
        clock[0] += 0.5
        w.step(64)
    with w.paused():  # a checkpoint save: not step time
        clock[0] += 10.0
    assert w.read() == (0.5, 128.0)
    clock[0] += 3.0
    w.step(32)
    assert w.read() == (3.0, 32 / 3.0)


def test_purpose_key():
    assert [meter.purpose_key(p) for p in ("parameter averaging", "ZeRO all-gather", "gradient exchange")] == \
        ["parameter_averaging", "zero_all_gather", "gradient_exchange"]


def test_history_start_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    f = tmp_path / "history.jsonl"
    recs = [{"step": s, "train/loss": s / 10} for s in (2, 4, 5, 6, 8)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9, "train/lo')  # cut short by a kill
    assert _history_start(str(tmp_path), 6) == recs[:4]  # resumed from step 6: 8 and 9 are dropped
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [2, 4, 5, 6]
    assert _history_start(str(tmp_path), None) == [] and f.read_text() == ""  # a fresh run starts empty
