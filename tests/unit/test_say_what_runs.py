"""Issue 30: a run says what runs. Each method's own ``describe()`` line (every registered reducer, synchronizer and
order, with and without PowerSGD's plain-allreduce warm-up), what ``attach`` logs on rank 0 and that a program
with no logging configured sees it, the misspelled ``ds_ext`` block refused, world size 1 saying that nothing was
communicated, readable ``summary()`` / ``by_kind``, the CPU thread rule, and the papercuts (the full
``ds_ext.attach`` docstring, typed options at the top level, ``methods options``, a mistyped ``--recipe``, the
composition page). In-process: the methods on a 2-rank ``LoopbackWorld``, ``attach`` on a stand-in engine at world
size 1 (the real launches: tests/e2e/test_trainer.py)."""
from __future__ import annotations

import logging
import re
import types
from pathlib import Path

import pytest
import torch

import ds_ext
from ds_ext.deepspeed import announce, threads
from ds_ext.deepspeed.attach import attach
from ds_ext.meter import CommMeter
from ds_ext.registry import ORDERS, REDUCERS, SYNCS
from ds_ext.testing import StandInEngine
from ds_ext.spec import RecipeError, near_miss_keys
from ds_ext.testing import LoopbackWorld

ROOT = Path(__file__).resolve().parents[2]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


# 4 tensors; at rank 4 both matrices pass PyTorch's rule (n + m) r 2 < n m. Per step, fp32:
# dense 4 (64*128 + 128 + 128*10 + 10) = 38440 B = 37.5 KiB; PowerSGD P: 4 (128*4 + 10*4 + 128 + 10) = 2760 B,
# Q: 4 (64*4 + 128*4) = 3072 B, together 5832 B = 5.7 KiB
DENSE, POWERSGD = "37.5 KiB", "5.7 KiB"


def StandIn(config=None):
    """A stand-in engine at world size 1 (no process group) over this file's model."""
    return StandInEngine(model(), lr=0.1, config=config)


def train_step(engine):
    engine.module(torch.randn(8, 64)).sum().backward()
    engine.step()


# ---------------------------------------------------------------- each method's own line, 2 simulated ranks
REDUCER_OPTIONS = {"powersgd": {"rank": 4, "start_powerSGD_iter": 0}, "acpsgd": {"rank": 4}}
REDUCER_SAYS = {
    "allreduce": f"allreduce: every gradient averaged exactly, no compression (4 tensors in 1 bucket(s) of <= 25 MiB, "
                 f"launched during backward), ~{DENSE}/step",
    "half": f"half fp16: every gradient averaged in fp16 on the wire (4 tensors, bucketed, during backward), "
            f"~18.8 KiB/step vs {DENSE} uncompressed",
    "deepspeed": f"deepspeed: DeepSpeed's own gradient allreduce, unchanged (ds_ext only meters it), 4 tensors, "
                 f"~{DENSE}/step in fp32",
    "none": "none: no gradient communication; each rank steps on its own gradient",
    "powersgd": f"powersgd rank 4: 2 of 4 tensors compressed, ~{POWERSGD}/step vs {DENSE} uncompressed",
    "acpsgd": f"acpsgd rank 4: 2 of 4 tensors compressed (P and Q steps alternate, one all_reduce each), ~",
    "topk": f"topk density 0.001: 9 of 9,610 gradient elements per rank, (index, value) pairs all_gathered, "
            f"error feedback on, ~108 B/step vs {DENSE} uncompressed",
    "exdyna": "exdyna density 0.001: ~9 of 9,610 gradient elements selected per step over all ranks",
    "signsgd": f"signsgd: 1 bit per gradient element + one fp32 scale per tensor, all_gathered (4 tensors; 1 "
               f"bucket(s) launched during backward), error feedback on, ~1.2 KiB/step vs {DENSE} uncompressed",
    "cdgrab": "cdgrab: every microbatch gradient all_gathered (4 tensors, ~37.5 KiB per microbatch per rank)",
}


def _describe_all(comm):
    named = list(model().named_parameters())
    out = {}
    for name in REDUCERS.names():
        r = REDUCERS.build(name, REDUCER_OPTIONS.get(name, {}), named, comm=comm)
        out[name] = r.describe()
    warm = REDUCERS.build("powersgd", {"rank": 4}, named, comm=comm)
    out["powersgd warm-up"] = warm.describe()
    out["powersgd whole run"] = warm.describe(total_steps=12)
    for label, name, opts in (("local", "local", {}), ("local qsr", "local", {"period": "qsr", "alpha": 0.05}),
                              ("local postlocal", "local", {"period": "postlocal", "switch_step": 50}),
                              ("dssync", "dssync", {}), ("none", "none", {})):
        s = SYNCS.build(name, opts, named, comm=comm, module=None, optimizer=None, lr_at=lambda step: 0.1)
        out[f"sync {label}"] = s.describe()
    for name in ORDERS.names():
        out[f"order {name}"] = ORDERS.build(name, {}, 1000, comm.rank, 2, 0).describe()
    return out


def test_every_method_describes_itself_with_and_without_warm_up():
    said = LoopbackWorld(2).run(_describe_all)
    assert said[0] == said[1]
    got = said[0]
    assert set(REDUCER_SAYS) == set(REDUCERS.names()), "a new reducer: add its line here"
    for name, want in REDUCER_SAYS.items():
        assert got[name].startswith(want), (name, got[name])
    assert "plain allreduce" not in got["powersgd"]  # start_powerSGD_iter 0
    assert got["powersgd warm-up"].endswith("; plain allreduce until step 1000: start_powerSGD_iter")
    assert got["powersgd whole run"].endswith("plain allreduce for all 12 steps of this run: start_powerSGD_iter "
                                              "1000 >= 12, nothing is compressed (lower start_powerSGD_iter)")
    assert got["sync local"] == ("local: parameters (37.5 KiB) averaged over all 2 ranks; period constant H=4, "
                                 "first round H=4")
    assert "period qsr alpha=0.05" in got["sync local qsr"]
    assert "period post-local: data-parallel until step 50, then H=4" in got["sync local postlocal"]
    assert got["sync dssync"].startswith("dssync: parameters (37.5 KiB + BatchNorm statistics) averaged within 2 "
                                         "groups of 1 ranks, shuffled at every sync (seeded, a pool of 16); period "
                                         "constant H=1")
    assert got["sync none"] is None  # nothing to add to the reducer's line
    assert got["order rr"] == "rr: Distributed random reshuffling: fixed local shard, new seeded permutation each " \
                              "epoch; 500 examples per rank"
    assert got["order dgrab"].startswith("dgrab: D-GraB PairBalance") and "(project_dim 0, remainder drop)" in \
        got["order dgrab"]
    assert got["order cdgrab"].startswith("cdgrab: CD-GraB")


# ---------------------------------------------------------------------------------- attach at world size 1
@pytest.fixture
def ds_ext_logger():
    """The ``ds_ext`` logger as a fresh process has it (no handler, no level), put back after."""
    lg = logging.getLogger("ds_ext")
    saved = (lg.handlers[:], lg.level)
    lg.handlers[:] = []
    lg.setLevel(logging.NOTSET)
    yield lg
    lg.handlers[:] = saved[0]
    lg.setLevel(saved[1])


def test_attach_logs_one_line_per_method_that_a_default_user_sees(ds_ext_logger, capsys):
    engine = StandIn({"ds_ext": {"reducer": {"name": "powersgd", "rank": 4}}})
    pytest_handlers = logging.root.handlers[:]  # a program that configured no logging: none on the root either
    logging.root.handlers.clear()
    try:
        att = attach(engine, total_steps=12)
        err = capsys.readouterr().err.splitlines()
        train_step(engine)
        # once the program configures logging, the fallback stays quiet (its records go there, once)
        seen = []
        handler = logging.Handler()
        handler.emit = seen.append
        logging.root.addHandler(handler)
        att.detach()
        attach(engine, {"reducer": {"name": "powersgd", "rank": 4, "start_powerSGD_iter": 0}, "sync": "none"})
    finally:
        logging.root.handlers[:] = pytest_handlers
    assert err[0] == "[ds_ext] " + att.description[0] and att.description[0].startswith(
        f"powersgd rank 4: 2 of 4 tensors compressed, ~{POWERSGD}/step vs {DENSE} uncompressed; plain allreduce "
        f"for all 12 steps of this run")
    assert err[1] == ("[ds_ext] world size 1: nothing communicated (the methods run, their collectives are skipped); "
                      "for data parallel start every process with the launcher: deepspeed --num_gpus 2 your_script.py")
    assert err[2].startswith("[ds_ext] powersgd compresses nothing in this run: start_powerSGD_iter 1000 >= the run's "
                             "12 optimizer steps")
    assert att.summary() == ("ds_ext (powersgd): nothing communicated (world size 1) over 1 steps; the methods' "
                             "collectives are skipped without other ranks")
    assert capsys.readouterr().err == ""
    assert seen[0].getMessage() == f"powersgd rank 4: 2 of 4 tensors compressed, ~{POWERSGD}/step vs {DENSE} " \
                                   f"uncompressed"


def test_attach_lines_go_through_logging_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="ds_ext"):
        att = attach(StandIn(), {"reducer": "none", "sync": {"name": "local", "h": 2}})
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "ds_ext.deepspeed.announce"]
    assert [m for _, m in lines[:2]] == att.description == [
        "none: no gradient communication; each rank steps on its own gradient (the synchronizer averages parameters)",
        "local: parameters (37.5 KiB) averaged over all 1 ranks; period constant H=2, first round H=2"]
    assert all(level == logging.INFO for level, _ in lines)


@pytest.mark.parametrize("key", ["ds-ext", "dsext", "ds_ext ", "DS_EXT", "ds.ext", "ds_ect"])
def test_a_misspelled_ds_ext_block_is_an_error_naming_the_key(key):
    with pytest.raises(RecipeError) as e:
        attach(StandIn({key: {"reducer": {"name": "powersgd", "rank": 4}}}))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"DeepSpeed config: {key}: looks like the ds_ext block misspelled")
    assert msg.endswith(f"rename {key!r} to \"ds_ext\"")
    with pytest.raises(RecipeError, match="looks like the ds_ext block misspelled"):  # a method given: still said
        attach(StandIn({key: {}}), {"reducer": "allreduce"})


def test_only_near_misses_are_refused():
    ordinary = ["train_batch_size", "zero_optimization", "bf16", "fp16", "gradient_clipping", "data_types",
                "comms_logger", "steps_per_print", "wall_clock_breakdown", "dataloader_drop_last", "ds_ext", "amp"]
    assert near_miss_keys({k: 1 for k in ordinary}) == []
    att = attach(StandIn({"ds_ext": {"reducer": "allreduce"}, "ds-ext": {}}))  # both: the real one is read
    assert att.description[0].startswith("allreduce:")


def test_the_recipe_route_refuses_a_misspelled_block_with_exit_2(host, capsys):
    from ds_ext.trainer.cli import train_main

    code = train_main(["--recipe", "quickstart", "--host-config", host, "--check",
                       "--set", "deepspeed.ds-ext={reducer: powersgd}"])
    err = capsys.readouterr().err
    assert code == 2 and "deepspeed.ds-ext: looks like the ds_ext block misspelled" in err, err


# ---------------------------------------------------------------------------------------------- summaries
def test_meter_summary_and_by_kind_read_in_human_units():
    m = CommMeter()
    m.world_size = 2
    m.add("powersgd_p", 3 * 2**20, op="all_reduce")
    m.add("zero_allgather", 512 * 2**10)
    m.end_step()
    m.add("powersgd_p", 3 * 2**20, op="all_reduce")
    m.end_step()
    assert repr(m.by_kind) == str(m.by_kind) == "{powersgd_p: 6.0 MiB, zero_allgather: 512.0 KiB}"
    assert m.by_kind["never"] == 0 and "never" not in m.by_kind and dict(m.by_kind) == {
        "powersgd_p": 6 * 2**20, "zero_allgather": 512 * 2**10}
    lines = m.summary().splitlines()
    assert lines[0] == "6.5 MiB per rank over 2 steps (3.2 MiB/step)"
    assert re.fullmatch(r"  powersgd_p\s+6\.0 MiB\s+3\.0 MiB/step  gradient exchange \(all_reduce\)", lines[1])
    assert re.fullmatch(r"  zero_allgather\s+512\.0 KiB\s+256\.0 KiB/step  ZeRO all-gather \(all_gather\)", lines[2])
    restored = CommMeter()
    restored.load_state_dict(m.state_dict())
    assert repr(restored.by_kind) == repr(m.by_kind)


def test_wandb_lines_name_the_run_and_how_to_sync_it():
    off = types.SimpleNamespace(name="quickstart", id="ab12cd34", offline=True,
                                settings=types.SimpleNamespace(sync_dir="runs/q/wandb/offline-run-1-ab12cd34"))
    assert announce.wandb_lines(off) == ["wandb run quickstart (id ab12cd34): offline; upload it with: wandb sync "
                                         "runs/q/wandb/offline-run-1-ab12cd34"]
    on = types.SimpleNamespace(name="q", id="x1", offline=False, url="https://wandb.ai/me/p/runs/x1")
    assert announce.wandb_lines(on) == ["wandb run q (id x1): https://wandb.ai/me/p/runs/x1"]
    assert announce.wandb_lines(None) == []


def test_the_hf_callback_logs_the_summary_at_the_end(caplog):
    from ds_ext.hf import DsExtCallback

    cb = DsExtCallback()
    cb.attachment = attach(StandIn(), {"reducer": "allreduce"})
    train_step(cb.attachment.engine)
    with caplog.at_level(logging.INFO, logger="ds_ext"):
        cb.on_train_end(None, None, None)
    assert [r.getMessage() for r in caplog.records if r.name == "ds_ext.hf"] == [cb.attachment.summary()]
    assert "nothing communicated (world size 1)" in cb.attachment.summary()


# ---------------------------------------------------------------------------------------------- threads
def test_thread_default_is_cores_per_local_rank_only_when_omp_num_threads_is_unset(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_done", False)
    assert threads.apply_default({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}, cores=8) is None
    assert threads.local_ranks({"LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "2"}) == 4
    assert threads.local_ranks({"LOCAL_SIZE": "2"}) == 2 and threads.local_ranks({}) == 1
    assert threads.target_threads(2, 2) == 1 and threads.target_threads(16, 3) == 5 and threads.target_threads(2, 8) == 1
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(threads, "_done", False)
        said = threads.apply_default({"LOCAL_SIZE": "2"}, cores=4)
        assert torch.get_num_threads() == 2
        assert said.startswith("OMP_NUM_THREADS is unset: torch intra-op threads 4 -> 2 (4 cores / 2 local rank(s)")
        assert threads.apply_default({"LOCAL_SIZE": "4"}, cores=4) is None  # once per process
        monkeypatch.setattr(threads, "_done", False)
        assert threads.apply_default({}, cores=4) is None and torch.get_num_threads() == 2  # never raised
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- papercuts
def test_attach_help_and_typed_options_at_the_top_level():
    doc = ds_ext.attach.__doc__
    for part in ("Args:", "method:", "total_steps:", "Returns:", "summary()", "Example::", "deepspeed --num_gpus 2"):
        assert part in doc, part
    from ds_ext import PowerSGDOptions, TopKOptions, options  # noqa: F401

    assert ds_ext.PowerSGDOptions is REDUCERS.get("powersgd").options
    for name in options.__all__:
        assert getattr(ds_ext, name) is getattr(options, name)
    att = attach(StandIn(), {"reducer": ds_ext.PowerSGDOptions(rank=4, start_powerSGD_iter=0)})
    assert att.description[0].startswith("powersgd rank 4: 2 of 4 tensors compressed")


def test_methods_options_names_each_alias_once_and_every_meaning(capsys):
    from ds_ext.methods import main

    assert main(["options", "acpsgd"]) == 0
    out = capsys.readouterr().out
    assert out.count("fusion_threshold_mb") == 1
    rows = {ln.split("|")[1].strip(" `"): ln.split("|")[3].strip() for ln in out.splitlines()[2:]}
    assert rows["seed"] and all(rows.values()), rows


def test_a_mistyped_recipe_name_lists_the_bundled_ones(capsys):
    from ds_ext.trainer.cli import train_main

    assert train_main(["--recipe", "quickstrat", "--check"]) == 2
    err = capsys.readouterr().err
    assert "quickstrat: recipe file not found" in err
    assert "did you mean --recipe quickstart? bundled recipes: " in err and "digits-acpsgd" in err


def test_schedule_names_the_recipe_a_typo_meant(capsys):
    from ds_ext.trainer.cli import schedule_main

    assert schedule_main(["--recipe", "qsr-vit-b-localadamv"]) == 2
    err = capsys.readouterr().err
    assert "recipe error" in err and "did you mean --recipe qsr-vit-b-localadamw?" in err


def test_the_composition_page_is_the_code_s_rules():
    """docs/guide/composing.md holds ``python -m ds_ext.methods compose`` between its markers, and the tables say
    what the rules say (spot checks: the audit's acpsgd + local qsr refused, acpsgd + post-local allowed)."""
    from ds_ext.methods import compose_markdown, compose_problems

    page = (ROOT / "docs" / "guide" / "composing.md").read_text()
    start, end = "<!-- generated: python -m ds_ext.methods compose -->\n", "\n<!-- end of generated tables -->"
    assert page[page.index(start) + len(start):page.index(end)] == compose_markdown(), \
        "docs/guide/composing.md is stale: paste the output of python -m ds_ext.methods compose between its markers"
    assert compose_problems("acpsgd", ("local", {"period": "qsr", "alpha": 0.01}), "rr")
    assert compose_problems("acpsgd", ("local", {"period": "postlocal", "switch_step": 5}), "rr") == []
    assert "| `acpsgd` | yes | no (1) | no (2) | yes | no (1) | yes |" in compose_markdown()


def test_deepspeed_backend_is_bound_to_the_non_deprecated_collectives(monkeypatch):
    import sys

    import torch.distributed as dist

    from ds_ext.deepspeed.compat import quiet_all_gather

    if not hasattr(dist, "all_gather_single"):
        pytest.skip("this torch has no all_gather_single: nothing deprecated to avoid")
    cdb = types.SimpleNamespace(all_gather_function=dist.all_gather_into_tensor,
                                reduce_scatter_function=dist.reduce_scatter_tensor)
    monkeypatch.setitem(sys.modules, "deepspeed.comm.comm", types.SimpleNamespace(cdb=cdb))
    assert quiet_all_gather() == ["all_gather_function", "reduce_scatter_function"]
    assert cdb.all_gather_function is dist.all_gather_single and cdb.reduce_scatter_function is dist.reduce_scatter_single
    assert quiet_all_gather() == []  # bound already
    monkeypatch.setitem(sys.modules, "deepspeed.comm.comm", types.SimpleNamespace(cdb=None))
    assert quiet_all_gather() == []


def _hierarchical(comm):
    from ds_ext.hierarchy import build_hierarchical
    from ds_ext.topology import Topology

    named = list(model().named_parameters())
    topo = Topology.explicit(comm.rank, 4, 2)
    return build_hierarchical("powersgd", {"rank": 4, "start_powerSGD_iter": 0}, named, comm, topo).describe()


def test_hierarchical_mode_names_the_node_mean_and_the_wrapped_method():
    said = LoopbackWorld(4).run(_hierarchical)
    assert all(s.startswith("hierarchical powersgd: exact gradient mean inside each node (2 ranks x 2 nodes); "
                            "between nodes, this rank's shard: powersgd rank 4: ") for s in said), said


def test_a_failing_describe_costs_its_line_not_the_run():
    att = attach(StandIn(), {"reducer": "allreduce"})

    def broken(total_steps=None):
        raise RuntimeError("boom")

    att.reducer.describe = broken
    assert announce.method_lines(att) == ["AllreduceReducer (no description: RuntimeError)"]
