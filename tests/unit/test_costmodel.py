"""The cost model's honest defaults (issue 18 item 7): the GPU projection's latency is a sourced figure for a
real network (NCCL's latency model), not the CPU emulation's fitted scheduling delay, which only ``--fit``
uses; the CLI prints its assumptions next to its table every time; the plot's legend hides no line, and a
missing matplotlib is said in one line. Fast: the digits CNN's shapes, no process group."""
import json
import sys

import pytest

from benchmarks import costmodel_fit as fit
from ds_ext.costmodel import model as cm
from ds_ext.costmodel import overlap as ov
from ds_ext.costmodel import project as pj
from ds_ext.costmodel import presets as ps

SMALL = ["--model", "digits_cnn", "--gpus", "8,16", "--bandwidth", "1,100", "--png", ""]


def test_default_latency_is_the_sourced_nccl_figure_not_the_cpu_fit():
    assert cm.DEFAULT_CONSTANTS.alpha_s == cm.NCCL_NET_ALPHA_S == 14e-6
    assert "NCCL" in cm.DEFAULT_CONSTANTS.alpha_source and "NCCL" in cm.DEFAULT_CONSTANTS.source
    assert cm.DEFAULT_CONSTANTS.eta_source  # eta's origin is stated too
    # the emulation's fit is kept, for --fit only: ~86x the network figure (CPU scheduling delay)
    assert cm.EMULATION_FIT_CONSTANTS.alpha_s == pytest.approx(1.2122e-3)
    assert "not network latency" in cm.EMULATION_FIT_CONSTANTS.alpha_source


def _assumptions(out):
    head, sep, _ = out.partition("## assumptions")
    assert sep, out[:2000]
    block = []
    for line in ("## assumptions" + out[len(head) + len(sep):]).splitlines()[1:]:
        if not line.startswith("# "):
            break
        block.append(line)
    return "\n".join(block)


def test_cli_prints_assumptions_and_the_latency_source_before_the_table(capsys):
    assert pj.main(SMALL) == 0
    out = capsys.readouterr().out
    block = _assumptions(out)
    assert out.index("## assumptions") < out.index("## projection A") < out.index("## projection B")
    assert "# network: 1, 100 Gbit/s per link; one link per GPU" in block
    assert "alpha = 14.0 us per ring hop, eta = 0.932 of the link rate" in block
    assert "#   latency source: NCCL's own latency model" in block and "Simple protocol" in block
    assert "#   eta source: fitted on the CPU emulation" in block
    assert "# compute: 30.5 ms/step (input; the default is a ResNet-50 bf16 step at batch 64 on an H100)" in block
    assert "# overlap: allreduce/acpsgd communication (launched during backward) hides behind backward = 0.67" in block
    assert "# compression: A: per method below" in block
    assert "intra-node" not in block  # flat projection: no intra-node link
    # the assumptions follow the options: no overlap, a given latency, another compute time
    assert pj.main(SMALL + ["--no-overlap", "--alpha-us", "0", "--compute-ms", "50"]) == 0
    block = _assumptions(capsys.readouterr().out)
    assert "# overlap: none (--no-overlap)" in block
    assert "alpha = 0.0 us per ring hop" in block and "#   latency source: given (--alpha-us 0)" in block
    assert "# compute: 50 ms/step (input)" in block
    assert cm.DEFAULT_CONSTANTS.alpha_s == 14e-6  # the CLI's overrides do not leak into the module's default


def test_hierarchical_cli_prints_the_intra_node_link_and_no_overlap(capsys):
    assert pj.main(["--hierarchical", "--model", "digits_cnn", "--gpus", "16", "--bandwidth", "10", "--png", ""]) == 0
    out = capsys.readouterr().out
    block = _assumptions(out)
    assert out.index("## assumptions") < out.index("## flat vs hierarchical")
    assert "8 GPUs per node sharing 1 link(s) per node" in block
    assert "alpha = 14.0 us per ring hop" in block and "NCCL" in block
    assert "# intra-node: 200 GB/s, 5 us per ring hop (inputs: NVLink-class" in block
    assert "hierarchical: none (the node mean needs every gradient)" in block
    assert "# compression: none" in block


def _result(world, shapes, comm_ms):
    opts = ps.MethodOptions()
    return {"kind": "benchmarks.cluster", "world": world, "bw_bits": 1e9, "bandwidth": "1gbit",
            "model": "digits_cnn", "shapes": shapes, "options": opts.__dict__,
            "methods": {m: {"comm_ms": ms, "compress_ms": 1.0, "wall_ms": ms + 1.0,
                            "meter_bytes": sum(c.calls * c.nbytes for c in cm.collectives(m, shapes, world, opts))}
                        for m, ms in comm_ms.items()}}


def test_fit_flag_uses_the_cpu_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/bench-cluster here: --fit takes the fit recorded in docs/results/costmodel.md
    assert fit.main(SMALL + ["--fit"]) == 0
    out = capsys.readouterr().out
    block = _assumptions(out)
    assert "no bench-cluster results in runs/bench-cluster" in out
    assert "alpha = 1212.2 us per ring hop, eta = 0.932" in block
    assert "#   latency source: fitted on the CPU emulation" in block and "not network latency" in block
    # with results in runs/bench-cluster, --fit fits them (constants made from a known alpha and eta)
    shapes = [list(s) for s in cm.model_shapes("digits_cnn")]
    truth = cm.Constants(alpha_s=5e-4, eta=0.8)
    comm = {m: 1e3 * cm.comm_seconds(cm.collectives(m, shapes, 4, ps.MethodOptions()), 1e9, truth)
            for m in ("allreduce", "powersgd", "signsgd")}
    (tmp_path / "runs" / "bench-cluster").mkdir(parents=True)
    (tmp_path / "runs" / "bench-cluster" / "N4.json").write_text(json.dumps(_result(4, shapes, comm)))
    assert fit.main(SMALL + ["--fit"]) == 0
    out = capsys.readouterr().out
    assert "## model check against the emulation" in out
    block = _assumptions(out)
    assert "alpha = 500.0 us per ring hop, eta = 0.800" in block
    assert "#   latency source: fitted on the CPU emulation" in block and "fitted on N=4, 1 Gbit/s, 3 methods" in block
    # and without --fit the same directory is not used: the sourced default
    assert pj.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "model check" not in out and "alpha = 14.0 us per ring hop" in _assumptions(out)


def _tables(methods, gpus, bws):
    with_c, without = {}, {}
    for bw in bws:
        for n in gpus:
            for i, m in enumerate(methods):
                with_c[(bw, n, m)] = 100.0 / (1 + i) * (1 + n / 64)
                without[(bw, n, m)] = 80.0 / (1 + i)
    return with_c, without


@pytest.mark.parametrize("bws", [[1.0, 10.0, 100.0], [10.0]])
def test_plot_legend_is_outside_every_axes(bws):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    methods, gpus = list(ps.ALL_METHODS), [8, 16, 32, 64]
    with_c, without = _tables(methods, gpus, bws)
    fig = pj.projection_figure(with_c, without, methods, gpus, bws, cm.DEFAULT_CONSTANTS, 30.5)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
        leg = fig.legends[0]
        box = leg.get_window_extent(renderer)
        labels = [t.get_text() for t in leg.get_texts()]
        assert [ps.LABELS[m] for m in methods] == labels[:len(methods)] and len(labels) == len(methods) + 2
        for ax in fig.axes:  # not over the data area, nor over the tick labels and axis labels
            assert not box.overlaps(ax.get_tightbbox(renderer)), (box, ax.get_tightbbox(renderer))
        fb = fig.bbox
        assert fb.x0 <= box.x0 and box.x1 <= fb.x1 and fb.y0 <= box.y0 and box.y1 <= fb.y1  # not cut off
    finally:
        plt.close(fig)


def test_plot_writes_the_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    methods, gpus, bws = ["allreduce", "powersgd"], [8, 16], [1.0, 100.0]
    with_c, without = _tables(methods, gpus, bws)
    png = tmp_path / "p.png"
    assert pj.plot(with_c, without, methods, gpus, bws, str(png), cm.DEFAULT_CONSTANTS, 30.5) == str(png)
    assert png.stat().st_size > 0 and f"# plot: {png}" in capsys.readouterr().out


def test_missing_matplotlib_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    methods, gpus, bws = ["allreduce", "powersgd"], [8], [1.0]
    with_c, without = _tables(methods, gpus, bws)
    assert pj.plot(with_c, without, methods, gpus, bws, str(tmp_path / "p.png"), cm.DEFAULT_CONSTANTS, 30.5) is None
    err = capsys.readouterr().err
    assert err.splitlines() == [pj.MATPLOTLIB_MISSING] and "matplotlib is not installed" in err
    assert not (tmp_path / "p.png").exists()
    # through the CLI: the tables are printed, the one line said, exit 0
    png = tmp_path / "cli.png"
    assert pj.main(SMALL[:-2] + ["--png", str(png)]) == 0
    cap = capsys.readouterr()
    assert cap.err.splitlines() == [pj.MATPLOTLIB_MISSING] and "## projection B" in cap.out and not png.exists()


# ------------------------------------------------------------------ issue 19: the launch-during-backward overlap term
def _bytes_ms(colls):
    """Test pricing: a collective's payload bytes are its milliseconds."""
    return float(sum(c.nbytes for c in colls))


def test_overlap_step_against_a_hand_computed_queue():
    from ds_ext.comm import Collective

    ready = [1.0, 0.9, 0.2]                       # parameter 2 ready at 20 % of backward, 0 and 1 at the end
    ar = lambda ms: Collective("all_reduce", ms, 2)  # noqa: E731
    launches = [ov.Launch([2], [ar(50.0)]), ov.Launch([0, 1], [ar(30.0)])]
    got = ov.overlap_step(10.0, 100.0, 5.0, ready, [(1.0, launches, [ar(7.0)])], _bytes_ms, 0.0, 3.0)
    # B = 100; launch 1 at 20, link free at 70; launch 2 ready at 100 (max of 1.0, 0.9), link free at 130:
    # 30 ms left after backward. step = 10 + 130 + 3 (compression) + 7 (after backward) + 5 = 155
    assert got == pytest.approx({"step_ms": 155.0, "comm_ms": 87.0, "hidden_ms": 50.0, "exposed_ms": 37.0})
    # the link backs up: launch 1 holds it until 110, launch 2 waits for it (not for its gradients) and ends at 140
    launches[0] = ov.Launch([2], [ar(90.0)])
    got = ov.overlap_step(10.0, 100.0, 5.0, ready, [(1.0, launches, [])], _bytes_ms)
    assert got == pytest.approx({"step_ms": 155.0, "comm_ms": 120.0, "hidden_ms": 80.0, "exposed_ms": 40.0})
    # compression in the gradient hooks stretches backward (B = 150): launch 1 at 30 -> 120, launch 2 at 150 -> 180
    got = ov.overlap_step(10.0, 100.0, 5.0, ready, [(1.0, launches, [])], _bytes_ms, 50.0, 0.0)
    assert got == pytest.approx({"step_ms": 195.0, "comm_ms": 120.0, "hidden_ms": 90.0, "exposed_ms": 30.0})
    # launches go in order: a later launch whose gradients are ready early still waits for the earlier one's
    early_last = [ov.Launch([0], [ar(10.0)]), ov.Launch([2], [ar(10.0)])]
    got = ov.overlap_step(0.0, 100.0, 0.0, ready, [(1.0, early_last, [])], _bytes_ms)
    assert got["step_ms"] == pytest.approx(120.0) and got["exposed_ms"] == pytest.approx(20.0)
    # all communication fits in backward: nothing exposed, the step is compute alone
    small = [ov.Launch([2], [ar(10.0)])]
    got = ov.overlap_step(10.0, 100.0, 5.0, ready, [(1.0, small, [])], _bytes_ms)
    assert got == pytest.approx({"step_ms": 115.0, "comm_ms": 10.0, "hidden_ms": 10.0, "exposed_ms": 0.0})
    # variants are averaged by weight (ACP-SGD's P- and Q-steps)
    v = ov.overlap_step(0.0, 100.0, 0.0, ready, [(0.5, small, []), (0.5, [], [ar(40.0)])], _bytes_ms)
    assert v == pytest.approx({"step_ms": 120.0, "comm_ms": 25.0, "hidden_ms": 5.0, "exposed_ms": 20.0})


def test_backward_schedule_matches_the_methods_own_traffic():
    shapes = [tuple(s) for s in cm.model_shapes("resnet18")]
    opts = ps.MethodOptions()
    (w, launches, after), = ov.backward_schedule("allreduce", shapes, 4, opts)
    assert w == 1.0 and after == []
    assert [la.colls[0].nbytes for la in launches] == cm.bucket_sizes(shapes, opts.bucket_mb)
    assert sorted(i for la in launches for i in la.members) == list(range(len(shapes)))
    p, q = ov.backward_schedule("acpsgd", shapes, 4, opts)
    gp, gq = cm.acpsgd_groups(shapes, opts.rank, opts.bucket_mb)
    assert (p[0], q[0]) == (0.5, 0.5)
    assert [la.colls[0].nbytes for la in p[1]] == gp and [la.colls[0].nbytes for la in q[1]] == gq
    # PowerSGD per fusion group: launch k = [P(k), Q(k-1)], the last Q after backward -- in issue order, exactly the
    # reducer's own collectives; signsgd per bucket (signs, scales), nothing after backward
    for m, tail in (("powersgd", 1), ("signsgd", 0)):
        (_, la, after), = ov.backward_schedule(m, shapes, 4, opts)
        assert len(la) >= 2 and len(after) == tail, m
        assert [c for x in la for c in x.colls] + after == cm.collectives(m, shapes, 4, opts), m
        assert sorted(i for x in la for i in x.members) == list(range(len(shapes))), m
    (_, la, _), = ov.backward_schedule("powersgd", shapes, 4, opts)
    assert [len(x.colls) for x in la] == [1] + [2] * (len(la) - 1)
    # every launch waits for its own gradients: its readiness is that of its last member (reverse order)
    ready = ov.flop_ready_fractions("resnet18", 64)
    for m in ("powersgd", "signsgd"):
        sched = ov.backward_schedule(m, shapes, 4, opts)
        got = ov.launch_ready(sched, ready)
        assert got == sorted(got) and got[0] < 0.5 and got[-1] == pytest.approx(1.0), m
        # priced as launched during backward: some of its communication hides behind it (1 ms per KB here)
        step = ov.overlap_step(10.0, 100.0, 5.0, ready, sched, lambda cs: sum(c.nbytes for c in cs) / 1e3)
        assert step["hidden_ms"] > 0 and step["comm_ms"] == pytest.approx(
            sum(c.nbytes for c in cm.collectives(m, shapes, 4, opts)) / 1e3), m
    # post-backward methods: their collectives, after backward; the hooks' share of their compression stretches
    # backward, the rest follows it
    for m in ("topk", "exdyna"):
        (_, la, after), = ov.backward_schedule(m, shapes, 4, opts)
        assert la == [] and after == cm.collectives(m, shapes, 4, opts)
        bwd, post = ov.compression_split(m, 100.0)
        assert bwd == pytest.approx(100.0 * ov.HOOK_SHARE[m]) and bwd + post == pytest.approx(100.0)
    assert ov.compression_split("allreduce", 50.0) == (0.0, 50.0)
    (_, la, after), = ov.backward_schedule("deepspeed", shapes, 4, opts)
    assert la == [] and [c.nbytes for c in after] == [4 * sum(cm.numel_of(s) for s in shapes)]
    # DDP: first bucket closes once it reaches 1 MiB, then 25 MiB, in reverse order
    assert ov.ddp_bucket_groups([3, 3, 3, 3, 3], 4, 6) == [[4, 3], [2, 1], [0]]
    (_, la, _), = ov.backward_schedule("ddp_allreduce", shapes, 4, opts)
    assert sum(x.colls[0].nbytes for x in la) == 4 * sum(cm.numel_of(s) for s in shapes)
    assert la[0].colls[0].nbytes >= 2**20 and len(la) >= 2
    # PyTorch's powerSGD_hook: (n, rest) views, compressed when (n + m) r 2 < n m
    assert ov.ddp_powersgd_bytes([(64, 32, 3, 3), (64,), (10, 4)], 4) == (4 * (64 + 40), 4 * 64 * 4, 4 * 288 * 4)


def test_flop_readiness_is_monotone_in_reverse_order_and_ends_at_one():
    ready = ov.flop_ready_fractions("resnet18", 64)
    shapes = cm.model_shapes("resnet18")
    assert len(ready) == len(shapes) and max(ready) == pytest.approx(1.0) and min(ready) > 0
    assert ready[0] == pytest.approx(1.0)          # the stem's convolution: the last gradient of backward
    assert ready[-1] < 0.05                         # the classifier: among the first
    # a model that takes no images: parameter bytes in reverse order
    lstm = ov.flop_ready_fractions("lstm_lm", 64)
    assert lstm[-1] <= lstm[0] == pytest.approx(1.0)


def test_cli_overlap_launch_prints_its_assumption(capsys):
    assert pj.main(SMALL + ["--overlap", "launch", "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    block = _assumptions(out)
    assert "# overlap: launch term: each method's collectives that its schedule launches during backward" in block
    assert "# ring model (NCCL's ring algorithm" in out and "# launch points at N = " in out
    assert "readiness estimated from multiply-accumulates (digits_cnn, 8px)" in block
    assert "## projection A" in out


def test_cli_runs_without_benchmarks_on_the_path(tmp_path):
    """The installed package alone: ``python -m ds_ext.costmodel`` (help, and a default projection) imports
    nothing from the checkout's ``benchmarks/``."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "ds_ext").symlink_to(root / "ds_ext")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    probe = subprocess.run([sys.executable, "-c", "import benchmarks"], cwd=tmp_path, env=env, capture_output=True)
    assert probe.returncode != 0  # benchmarks/ is out of reach here
    for args in (["--help"], ["--png", str(tmp_path / "p.png")]):
        r = subprocess.run([sys.executable, "-m", "ds_ext.costmodel", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "benchmarks" not in r.stderr
    assert "projection B" in r.stdout and "## assumptions" in r.stdout


def test_constants_and_readiness_files_round_trip(tmp_path, capsys):
    """What ``python -m benchmarks.costmodel_fit`` hands the projection: a constants file (alpha, eta, their
    sources, compression, options) and a readiness profile, read by ``--constants`` / ``--readiness``."""
    c = cm.Constants(alpha_s=2e-4, eta=0.5, source="test fit", alpha_source="a-src", eta_source="e-src")
    path = pj.write_constants(str(tmp_path / "c.json"), c, {"powersgd": ps.Compression("constant", 7.0)}, "mine",
                              ps.MethodOptions(rank=2))
    ready = pj.write_readiness(str(tmp_path / "r.json"), [1.0] * len(cm.model_shapes("digits_cnn")), "measured here",
                               "digits_cnn")
    assert pj.main(SMALL + ["--constants", path, "--readiness", ready, "--methods", "powersgd"]) == 0
    out = capsys.readouterr().out
    block = _assumptions(out)
    assert "alpha = 200.0 us per ring hop, eta = 0.500" in block and "a-src" in block and "e-src" in block
    assert "readiness measured here" in block
    assert "powersgd   7.0" in out and "(mine)" in out and "rank 2" in out
    with pytest.raises(SystemExit):
        pj.main(SMALL + ["--constants", str(tmp_path / "nope.json")])


def test_the_roster_accounts_for_every_registered_method():
    """One roster: every registered reducer, synchronizer and order has a preset, is a peer, or is declared not
    modelled (``presets.NOT_MODELLED``); the derived lists agree with the table."""
    from ds_ext.registry import ORDERS, REDUCERS, SYNCS, load_builtin

    load_builtin()
    assert ps.uncovered() == []
    for family, reg in (("reducer", REDUCERS), ("sync", SYNCS), ("order", ORDERS)):
        assert all(ps.covers(family, n) for n in reg.names())
    assert not ps.covers("reducer", "qsgd_not_registered")
    assert set(ps.method_specs(ps.MethodOptions())) == set(ps.ALL_METHODS) == set(ps.LABELS)
    assert set(ps.DEFAULT_COMPRESSION) == set(ps.ALL_METHODS)
    # hierarchical mode is read from the methods (their options and hierarchy.inner_problem), not listed
    assert {"allreduce", "powersgd", "acpsgd", "topk", "exdyna", "signsgd", "local_qsr"} <= set(ps.hier_methods())
    assert "dssync" not in ps.hier_methods() and "signsgd" not in ps.hier_default_methods()
    assert ps.SERIAL_TRAIN_METHODS == ("topk", "exdyna", "local_qsr", "dssync", "deepspeed",
                                       "ddp_powersgd_1b")   # DDP's powerSGD_hook with DDP's buckets: during backward
    assert ps.label_of("local_qsr") == "Local SGD + QSR (H=4)" and ps.label_of("ddp_powersgd") == "DDP powerSGD_hook r4"


def test_nothing_under_ds_ext_imports_benchmarks():
    """Research tooling stays out of the package: no module under ds_ext/ imports benchmarks/ (lazily either)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ds_ext"
    bad = []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{f.relative_to(root.parent)}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert bad == []
