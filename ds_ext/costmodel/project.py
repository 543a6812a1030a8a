"""``python -m ds_ext.costmodel``: the projection tables, their assumptions and the plot (the model:
``ds_ext/costmodel/model.py``)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import model as _model
from .model import (DEFAULT_CONSTANTS, EMULATION_ETA, INTRA_ALPHA_S, INTRA_BW_BITS, INTRA_SOURCE,
                    NCCL_NET_ALPHA_S, Constants, _numel, collectives, comm_seconds, model_shapes, project_hierarchical,
                    step_ms)
from .overlap import backward_schedule, compression_split, flop_ready_fractions, launch_ready, overlap_step
from .presets import (ALL_METHODS, DEFAULT_COMPRESSION, LABELS, Compression, MethodOptions,
                      applicable, hier_default_methods, hier_methods)


# ----------------------------------------------------------------------------------------- project
def project(methods, gpus, bws, shapes, opts, consts, compression: Dict[str, Compression], compute_ms: float,
            overlap: bool, backward_fraction: float, ready: Optional[Sequence[float]] = None) -> Dict[tuple, float]:
    """(Gbit/s, N, method) -> modelled step time in ms. ``ready`` (a readiness profile): the launch-during-backward
    term (``overlap_step``: backward = ``backward_fraction`` x compute, the rest before it, compression split
    between the gradient hooks and after backward by ``compression_split``) instead of the window term (``step_ms``)."""
    table = {}
    for bw in bws:
        for n in gpus:
            for m in methods:
                if applicable(m, n, opts):
                    continue
                c = compression.get(m)
                cms = c.at(n) if c else 0.0
                if ready is not None and overlap:
                    fn = lambda colls, bw=bw: 1e3 * comm_seconds(colls, bw * 1e9, consts)  # noqa: E731
                    table[(bw, n, m)] = overlap_step((1 - backward_fraction) * compute_ms,
                                                     backward_fraction * compute_ms, 0.0, ready,
                                                     backward_schedule(m, shapes, n, opts), fn,
                                                     *compression_split(m, cms))["step_ms"]
                    continue
                t = comm_seconds(collectives(m, shapes, n, opts), bw * 1e9, consts)
                table[(bw, n, m)] = step_ms(m, t, compute_ms, cms, overlap, backward_fraction)
    return table


def print_projection(title: str, table, methods, gpus, bws) -> None:
    print(f"\n## {title}")
    print("step time in ms, and speed-up over S-SGD (allreduce) at the same size and link")
    print(f"{'Gbit/s':>6} {'GPUs':>5} " + " ".join(f"{m:>15}" for m in methods))
    for bw in bws:
        for n in gpus:
            cells = []
            for m in methods:
                v = table.get((bw, n, m))
                cells.append(f"{'n/a':>15}" if v is None else f"{v:8.1f} {table[(bw, n, 'allreduce')] / v:5.2f}x")
            print(f"{bw:>6g} {n:>5} " + " ".join(cells))


def print_hierarchical(rows: List[dict], bound: Dict[tuple, float], consts: Constants, compute_ms: float,
                       gpus_per_node: int, nics_per_node: int, overlap: bool, backward_fraction: float,
                       compress: Dict[str, float]) -> None:
    """The flat-vs-hierarchical table with its assumptions; ``bound``: (bw, gpus, method) -> hierarchical
    over flat step speed-up with every latency at 0."""
    print(f"\n## flat vs hierarchical (node-aware): {gpus_per_node} GPUs per node, {nics_per_node} network link(s) "
          f"of BW per node")
    print(f"# network: alpha {consts.alpha_s * 1e6:.1f} us per ring hop, eta {consts.eta:.3f} ({consts.source}); "
          f"intra-node: {consts.intra_bw_bits / 8e9:g} GB/s, {consts.intra_alpha_s * 1e6:g} us per ring hop (inputs: "
          f"NVLink-class, see the module docstring)")
    print(f"# step = compute {compute_ms:g} ms (input) + compression ("
          + (", ".join(f"{k} {v:g} ms" for k, v in compress.items()) + "; hierarchical: / GPUs per node"
             if compress else "none: the bound a fast GPU implementation approaches")
          + ") + communication; flat "
          + (f"allreduce/acpsgd hide up to {backward_fraction:.2f} x compute behind backward" if overlap else "no overlap")
          + "; hierarchical: no overlap (the node mean needs every gradient)")
    print("# net MB/node: bytes a node sends over its network link per step (flat: one rank's ring sends; "
          "hierarchical: its local ranks' cross-node sends); comm = network + intra-node (hierarchical)")
    print("# speed-up = flat step / hierarchical step of the same method; x S-SGD = flat allreduce step / "
          "hierarchical step; alpha=0: the speed-up with every latency at 0 (bandwidth only)")
    print(f"{'Gbit/s':>6} {'GPUs':>4} {'nodes':>5} {'method':<10} {'netMB/node flat':>15} {'hier':>8} "
          f"{'comm ms flat':>12} {'hier':>8} {'(net':>8} {'+ intra)':>8} {'step ms flat':>12} {'hier':>8} "
          f"{'speed-up':>8} {'x S-SGD':>7} {'alpha=0':>7}")
    base = {(r["bw"], r["gpus"]): r["flat_step_ms"] for r in rows if r["method"] == "allreduce"}
    for r in rows:
        f, h = r["flat"], r["hier"]
        key = (r["bw"], r["gpus"])
        ssgd = f"{base[key] / r['hier_step_ms']:6.2f}x" if key in base else f"{'-':>7}"
        b = bound.get((r["bw"], r["gpus"], r["method"]))
        print(f"{r['bw']:>6g} {r['gpus']:>4} {r['nodes']:>5} {r['method']:<10} {f['net_bytes_node'] / 1e6:15.3f} "
              f"{h['net_bytes_node'] / 1e6:8.3f} {1e3 * f['comm_s']:12.1f} {1e3 * h['comm_s']:8.1f} "
              f"{1e3 * h['net_s']:8.1f} {1e3 * h['intra_s']:8.2f} {r['flat_step_ms']:12.1f} {r['hier_step_ms']:8.1f} "
              f"{r['flat_step_ms'] / r['hier_step_ms']:7.2f}x {ssgd} "
              + (f"{b:6.2f}x" if b is not None else f"{'-':>7}"))


DEFAULT_COMPUTE_MS = 30.5   # a ResNet-50 bf16 step at batch 64 on an H100: an input


def assumption_lines(consts: Constants, bws: Sequence[float], compute_ms: float, overlap: bool,
                     backward_fraction: float, hierarchical: bool = False, gpus_per_node: int = 8,
                     nics_per_node: int = 1, model: str = "", numel: int = 0, compression: str = "",
                     overlap_text: Optional[str] = None) -> List[str]:
    """The projection's assumptions, as the CLI prints them next to its table: link bandwidth, latency per hop
    and its source, efficiency and its source, compute time, overlap, intra-node link (hierarchical),
    compression."""
    rates = ", ".join(f"{b:g}" for b in bws)
    lines = ["## assumptions (inputs and constants of this projection, not GPU measurements)"]
    if model:
        lines.append(f"# model: {model} ({numel:,} fp32 values sent as gradients)")
    if hierarchical:
        lines.append(f"# network: {rates} Gbit/s per link; {gpus_per_node} GPUs per node sharing {nics_per_node} "
                     f"link(s) per node; non-blocking switch; a flat ring spanning nodes prices every hop at alpha")
    else:
        lines.append(f"# network: {rates} Gbit/s per link; one link per GPU (each GPU a host), non-blocking switch; "
                     f"every ring hop a network hop")
    lines.append(f"# constants ({consts.source}): alpha = {consts.alpha_s * 1e6:.1f} us per ring hop, "
                 f"eta = {consts.eta:.3f} of the link rate")
    lines.append(f"#   latency source: {consts.alpha_source or consts.source}")
    lines.append(f"#   eta source: {consts.eta_source or consts.source}")
    lines.append(f"# compute: {compute_ms:g} ms/step (input"
                 + ("; the default is a ResNet-50 bf16 step at batch 64 on an H100)"
                    if compute_ms == DEFAULT_COMPUTE_MS else ")"))
    ov = (f"allreduce/acpsgd communication (launched during backward) hides behind backward = "
          f"{backward_fraction:.2f} x compute (input); the other methods communicate after backward"
          if overlap else "none (--no-overlap): compute + compression + communication in series")
    if overlap and overlap_text:
        ov = overlap_text
    lines.append(f"# overlap: {'flat: ' if hierarchical else ''}{ov}"
                 + ("; hierarchical: none (the node mean needs every gradient)" if hierarchical else ""))
    if hierarchical:
        lines.append(f"# intra-node: {consts.intra_bw_bits / 8e9:g} GB/s, {consts.intra_alpha_s * 1e6:g} us per ring "
                     f"hop ({INTRA_SOURCE})")
    if compression:
        lines.append(f"# compression: {compression}")
    return lines


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _parse_compress(items: Sequence[str]) -> Dict[str, float]:
    out = {}
    for it in items:
        for kv in it.split(","):
            if not kv.strip():
                continue
            k, _, v = kv.partition("=")
            try:
                if k not in LABELS:
                    raise ValueError
                out[k] = float(v)
            except ValueError:
                raise SystemExit(f"--compress-ms {kv!r}: expected METHOD=MS with METHOD one of "
                                 f"{', '.join(LABELS)}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.costmodel", description=_model.__doc__.split("\n\n")[0],
                                 epilog="Fitting the constants on bench-cluster results and checking the model against "
                                        "measurements: python -m benchmarks.costmodel_fit (a checkout, not installed).")
    ap.add_argument("--methods", default=None, help="comma list (default: all; with --hierarchical: "
                                                    "presets.hier_default_methods)")
    ap.add_argument("--gpus", default=None, help="data-parallel ranks to project to (default 8,16,32,64; "
                                                 "with --hierarchical 16,32,64)")
    ap.add_argument("--bandwidth", default="1,10,100", help="link rates in Gbit/s")
    ap.add_argument("--model", default="resnet50", help="registered model whose gradient shapes are sent")
    ap.add_argument("--compute-ms", type=float, default=DEFAULT_COMPUTE_MS,
                    help="per-step compute time, an input (default: ResNet-50 bf16 batch 64 on an H100)")
    ap.add_argument("--backward-fraction", type=float, default=2.0 / 3.0,
                    help="share of the compute that is backward (allreduce/acpsgd communication hides there)")
    ap.add_argument("--no-overlap", action="store_true", help="serial: no communication hidden behind backward")
    ap.add_argument("--overlap", choices=("window", "launch"), default=None,
                    help="window (default): allreduce/acpsgd hide up to --backward-fraction x compute; launch: each "
                         "bucket / fusion group is launched when its gradients are ready during backward and the link "
                         "serves launches in order (overlap_step), readiness estimated from multiply-accumulates at "
                         "--image-size unless --readiness gives a measured profile")
    ap.add_argument("--readiness", default=None, metavar="FILE",
                    help="a measured readiness profile (JSON: ready, source, model; written by python -m "
                         "benchmarks.costmodel_fit --overlap-from); used when it is --model's (implies --overlap "
                         "launch)")
    ap.add_argument("--image-size", type=int, default=224,
                    help="input size of the readiness estimate (--overlap launch)")
    ap.add_argument("--constants", default=None, metavar="FILE",
                    help="constants file (JSON: alpha_s, eta, their sources, optionally compression and options; "
                         "written by python -m benchmarks.costmodel_fit --fit) instead of the GPU default")
    ap.add_argument("--compress-ms", action="append", default=[], metavar="METHOD=MS,...",
                    help="fixed compression times per method (e.g. measured on a GPU)")
    ap.add_argument("--alpha-us", type=float, default=None,
                    help=f"replace the latency per ring hop, microseconds (default {NCCL_NET_ALPHA_S * 1e6:g}: NCCL's "
                         f"latency model, InfiniBand/RoCE)")
    ap.add_argument("--eta", type=float, default=None,
                    help=f"replace the bandwidth-efficiency constant (default {EMULATION_ETA:.3f})")
    ap.add_argument("--qsr-h", type=int, default=None, help="QSR period H for local_qsr (default 4: the ViT-B "
                    "recipe at peak LR; its whole schedule averages 93,600/9,711 = 9.64 steps per sync)")
    ap.add_argument("--hierarchical", action="store_true",
                    help="project flat vs hierarchical (node-aware) mode per method instead (module docstring)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node, for --hierarchical")
    ap.add_argument("--nics-per-node", type=int, default=1,
                    help="network links of --bandwidth per node, shared by its ranks (--hierarchical)")
    ap.add_argument("--intra-bw", type=float, default=INTRA_BW_BITS / 1e9,
                    help="intra-node bandwidth in Gbit/s (default 1600 = 200 GB/s, NVLink-class; an input)")
    ap.add_argument("--intra-alpha-us", type=float, default=INTRA_ALPHA_S * 1e6,
                    help="intra-node latency per ring hop, microseconds (an input)")
    ap.add_argument("--png", default="runs/costmodel/projection.png", help="plot path ('' for none)")
    ap.add_argument("--csv", default=None, help="also write both projections as CSV")
    return ap


class UsageError(Exception):
    """A bad command line: the message goes to stderr and the CLI exits with 2."""


#: what ``python -m benchmarks.costmodel_fit`` writes and ``--constants`` / ``--readiness`` read
CONSTANTS_KIND = "ds_ext.costmodel.constants"
READINESS_KIND = "ds_ext.costmodel.readiness"


def _read_json(path: str, kind: str, flag: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {path}: not readable ({e})") from None
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise SystemExit(f"{flag} {path}: not a {kind} file")
    return d


def write_constants(path: str, consts: Constants, compression: Optional[Dict[str, Compression]] = None,
                    compression_source: str = "", options: Optional[MethodOptions] = None) -> str:
    """The file ``--constants`` reads: the two constants with their sources, and optionally fitted compression
    times (replacing the built-in ones) and the method options the measurements used."""
    d = {"kind": CONSTANTS_KIND, "alpha_s": consts.alpha_s, "eta": consts.eta, "source": consts.source,
         "alpha_source": consts.alpha_source, "eta_source": consts.eta_source}
    if compression is not None:
        d["compression"] = {m: [c.form, c.a, c.b] for m, c in compression.items()}
        d["compression_source"] = compression_source
    if options is not None:
        d["options"] = dict(options.__dict__)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(d, indent=1))
    return path


def write_readiness(path: str, ready: Sequence[float], source: str, model: str) -> str:
    """The file ``--readiness`` reads: a measured readiness profile of ``model`` and where it was measured."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"kind": READINESS_KIND, "ready": list(ready), "source": source, "model": model}))
    return path


def _methods_gpus_bws(args) -> tuple:
    if args.methods is None:
        args.methods = ",".join(hier_default_methods() if args.hierarchical else ALL_METHODS)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in LABELS]
    if bad:
        raise UsageError(f"--methods: unknown {', '.join(bad)}; known: {', '.join(LABELS)}")
    if "allreduce" not in methods:
        methods.insert(0, "allreduce")  # the baseline of every speed-up
    if args.gpus is None:
        args.gpus = "16,32,64" if args.hierarchical else "8,16,32,64"
    try:
        gpus = [int(x) for x in _floats(args.gpus)]
        bws = _floats(args.bandwidth)
    except ValueError as e:
        raise UsageError(f"--gpus / --bandwidth: comma-separated numbers ({e})") from None
    if not gpus or not bws or min(gpus) < 1 or min(bws) <= 0:
        raise UsageError("--gpus / --bandwidth: positive numbers")
    return methods, gpus, bws


def _inputs(args) -> tuple:
    """(constants, compression per method, its source, method options, given compression ms) from the defaults,
    the constants file and the flags."""
    opts = MethodOptions()
    compression = dict(DEFAULT_COMPRESSION)
    comp_src = "built in (bench-cluster on this CPU)"
    consts = replace(DEFAULT_CONSTANTS)
    if args.constants:
        d = _read_json(args.constants, CONSTANTS_KIND, "--constants")
        consts = Constants(alpha_s=float(d["alpha_s"]), eta=float(d["eta"]), source=d.get("source", args.constants),
                           alpha_source=d.get("alpha_source", ""), eta_source=d.get("eta_source", ""))
        if "compression" in d:
            compression = {m: Compression(f, a, b) for m, (f, a, b) in d["compression"].items()}
            comp_src = d.get("compression_source", args.constants)
        if "options" in d:
            opts = MethodOptions(**d["options"])
    if args.qsr_h is not None:
        opts.qsr_h_base, opts.qsr_alpha = args.qsr_h, 0.0
    if args.alpha_us is not None:
        if args.alpha_us < 0:
            raise UsageError("--alpha-us must be >= 0")
        consts = replace(consts, alpha_s=args.alpha_us * 1e-6, source=f"alpha given, eta {consts.source}",
                         alpha_source=f"given (--alpha-us {args.alpha_us:g})")
    if args.eta is not None:
        if args.eta <= 0:
            raise UsageError("--eta must be > 0")
        consts = replace(consts, eta=args.eta, source=f"eta given, alpha {consts.source}",
                         eta_source=f"given (--eta {args.eta:g})")
    if args.intra_bw <= 0 or args.intra_alpha_us < 0 or args.gpus_per_node < 1 or args.nics_per_node < 1:
        raise UsageError("--intra-bw must be > 0, --intra-alpha-us >= 0, --gpus-per-node and --nics-per-node >= 1")
    consts.intra_bw_bits, consts.intra_alpha_s = args.intra_bw * 1e9, args.intra_alpha_us * 1e-6
    given = _parse_compress(args.compress_ms)
    for m, v in given.items():
        compression[m] = Compression("constant", v, 0.0)
    if given:
        comp_src += f"; given: {', '.join(f'{k} {v:g} ms' for k, v in given.items())}"
    return consts, compression, comp_src, opts, given


def _launch_inputs(args, shapes, opts) -> tuple:
    """(readiness profile, the overlap line of the assumptions) of the launch term, or (None, None)."""
    if args.readiness is None and args.overlap != "launch":
        return None, None
    if args.hierarchical:
        raise UsageError("--overlap launch / --readiness: flat projections only (hierarchical mode never overlaps)")
    ready, src = None, None
    if args.readiness is not None:
        d = _read_json(args.readiness, READINESS_KIND, "--readiness")
        if d.get("model") == args.model:
            ready, src = [float(v) for v in d["ready"]], d.get("source", args.readiness)
    if ready is None:
        ready = flop_ready_fractions(args.model, args.image_size)
        src = f"estimated from multiply-accumulates ({args.model}, {args.image_size}px)"
    sched = backward_schedule("allreduce", shapes, 2, opts)
    text = (f"launch term: each method's collectives that its schedule launches during backward (launch points "
            f"below) start during backward (= {args.backward_fraction:.2f} x compute, input) when their gradients "
            f"are ready (readiness "
            f"{src}; allreduce's {len(sched[0][1])} buckets ready at "
            + ", ".join(f"{v:.2f}" for v in launch_ready(sched, ready))
            + " of backward), the link serves launches in order and what remains at the end of backward "
              "is exposed; compression split by compression_split (the measured share in the gradient hooks "
              "lengthens backward, the rest after it); the rest of each method's collectives after backward")
    return ready, text


RING_MODEL = ("# ring model (NCCL's ring algorithm, one ring over the N GPUs, each hop a network hop): all_reduce = "
              "2(N-1) x alpha + 2(N-1)/N x bytes / (eta x BW); all_gather = (N-1) x alpha + (N-1) x bytes / (eta x "
              "BW); collectives of one step share the link one after another (no two at once, no tree algorithm, no "
              "NVLink inside a node, no congestion)")


def launch_point_lines(methods, shapes, n: int, opts: MethodOptions, ready: Sequence[float]) -> List[str]:
    """Where the launch term places each method's collectives (``overlap.backward_schedule`` at ``n`` ranks): the
    launches during backward, each at the readiness of its last gradient, and what is left after backward."""
    lines = [f"# launch points at N = {n} (fraction of backward when each launch's gradients are ready; from "
             f"ds_ext/costmodel/overlap.py's schedule of each method):"]
    for m in methods:
        sched = backward_schedule(m, shapes, n, opts)
        w, launches, after = sched[0]
        during = launch_ready(sched, ready) if launches else []
        text = (f"{len(launches)} during backward at " + ", ".join(f"{v:.2f}" for v in during)
                if launches else "none during backward")
        text += f"; {len(after)} collective(s) after backward" if after else ""
        if len(sched) > 1:
            text += f" (first of {len(sched)} alternating step variants)"
        lines.append(f"#   {m:<10} {text}")
    return lines


def _print_compression(methods, gpus, compression, comp_src) -> None:
    print(f"# compression ms/step at N = {', '.join(str(n) for n in gpus)} ({comp_src}):")
    for m in methods:
        c = compression.get(m)
        if c is None:
            print(f"#   {m:<10} none measured: 0")
            continue
        form = {"constant": f"{c.a:.1f}", "linear": f"{c.a:.1f} + {c.b:.2f} N", "inverse": f"{c.a:.1f} + {c.b:.1f} / N"}
        print(f"#   {m:<10} {form[c.form]:<18} -> " + ", ".join(f"{c.at(n):.0f}" for n in gpus))


def _write_csv(path: str, with_c, without) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("projection,bandwidth_gbit,gpus,method,step_ms,speedup_over_ssgd\n")
        for name, table in (("A_cpu_compression", with_c), ("B_no_compression", without)):
            for (bw, n, m), v in sorted(table.items()):
                f.write(f"{name},{bw:g},{n},{m},{v:.3f},{table[(bw, n, 'allreduce')] / v:.4f}\n")
    print(f"# csv: {path}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2


def _run(args) -> int:
    methods, gpus, bws = _methods_gpus_bws(args)
    consts, compression, comp_src, opts, given = _inputs(args)
    shapes = model_shapes(args.model)
    numel = sum(_numel(s) for s in shapes)
    overlap = not args.no_overlap
    ready, overlap_text = _launch_inputs(args, shapes, opts)
    if args.hierarchical:
        hier_given = {m: v for m, v in given.items() if m in methods and m in hier_methods()}
        comp_note = (f"given: {', '.join(f'{k} {v:g} ms' for k, v in hier_given.items())} for the flat method, "
                     f"/ {args.gpus_per_node} (its shard) for hierarchical" if hier_given
                     else "none (left out: the bound a fast GPU implementation approaches; --compress-ms gives it)")
    else:
        comp_note = (f"A: per method below, {comp_src}; B: none (the bound a fast GPU implementation "
                     f"approaches)")
    print("\n".join(assumption_lines(consts, bws, args.compute_ms, overlap, args.backward_fraction,
                                     args.hierarchical, args.gpus_per_node, args.nics_per_node, args.model, numel,
                                     comp_note, overlap_text)))
    if args.hierarchical:
        print(f"# local_qsr: H = {opts.qsr_h}; rank {opts.rank}; density {opts.density}")
        return _main_hierarchical(args, methods, gpus, bws, shapes, opts, consts, given, overlap)
    print(RING_MODEL)
    if ready is not None and overlap:
        print("\n".join(launch_point_lines(methods, shapes, gpus[0], opts, ready)))
        print(f"# backward = {args.backward_fraction:.2f} x compute (input); forward + optimizer the rest; compression "
              f"is on the critical path (projection A: the share measured in the gradient hooks lengthens backward, "
              f"ds_ext/costmodel/overlap.py HOOK_SHARE, the rest runs after it), or is free (B); S-SGD buckets: first "
              f"{opts.first_bucket_mb:g} MiB, then {opts.bucket_mb:g} MiB; DDP's hooks are not projected")
    _print_compression(methods, gpus, compression, comp_src)
    print(f"# local_qsr: H = {opts.qsr_h}; dssync: {opts.dssync_groups} groups, every step; rank {opts.rank}; "
          f"density {opts.density}")
    with_c = project(methods, gpus, bws, shapes, opts, consts, compression, args.compute_ms, overlap,
                     args.backward_fraction, ready)
    without = project(methods, gpus, bws, shapes, opts, consts, {}, args.compute_ms, overlap,
                      args.backward_fraction, ready)
    print_projection("projection A: compression at the speed measured on this CPU (one thread)",
                     with_c, methods, gpus, bws)
    print_projection("projection B: compression free (communication + compute only; the bound a fast GPU "
                     "implementation approaches)", without, methods, gpus, bws)
    if args.csv:
        _write_csv(args.csv, with_c, without)
    if args.png:
        plot(with_c, without, methods, gpus, bws, args.png, consts, args.compute_ms)
    return 0


def _main_hierarchical(args, methods, gpus, bws, shapes, opts, consts, given, overlap) -> int:
    g = args.gpus_per_node
    with_mode = hier_methods()
    skipped = [m for m in methods if m not in with_mode]
    methods = [m for m in methods if m in with_mode]
    bad = [n for n in gpus if n % g]
    if bad:
        print(f"--gpus {', '.join(map(str, bad))}: not a multiple of --gpus-per-node {g}", file=sys.stderr)
        return 2
    if skipped:
        print(f"# no hierarchical mode, not projected: {', '.join(skipped)}")
    compress = {m: v for m, v in given.items() if m in methods}
    rows = project_hierarchical(methods, gpus, bws, shapes, opts, consts, args.compute_ms, g, args.nics_per_node,
                                overlap, args.backward_fraction, compress)
    free = Constants(0.0, consts.eta, consts.source, consts.intra_bw_bits, 0.0)
    bound = {(r["bw"], r["gpus"], r["method"]): r["flat_step_ms"] / r["hier_step_ms"]
             for r in project_hierarchical(methods, gpus, bws, shapes, opts, free, args.compute_ms, g,
                                           args.nics_per_node, overlap, args.backward_fraction, compress)}
    print_hierarchical(rows, bound, consts, args.compute_ms, g, args.nics_per_node, overlap, args.backward_fraction,
                       compress)
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w") as f:
            f.write("bandwidth_gbit,gpus,nodes,method,flat_net_bytes_node,hier_net_bytes_node,hier_cross_bytes_rank,"
                    "hier_intra_bytes_rank,flat_comm_ms,hier_comm_ms,hier_net_ms,hier_intra_ms,flat_step_ms,"
                    "hier_step_ms,speedup,speedup_alpha0\n")
            for r in rows:
                fl, h = r["flat"], r["hier"]
                f.write(f"{r['bw']:g},{r['gpus']},{r['nodes']},{r['method']},{fl['net_bytes_node']:.0f},"
                        f"{h['net_bytes_node']:.0f},{h['cross_bytes']:.0f},{h['intra_bytes']:.0f},"
                        f"{1e3 * fl['comm_s']:.4f},{1e3 * h['comm_s']:.4f},{1e3 * h['net_s']:.4f},"
                        f"{1e3 * h['intra_s']:.4f},{r['flat_step_ms']:.4f},{r['hier_step_ms']:.4f},"
                        f"{r['flat_step_ms'] / r['hier_step_ms']:.4f},"
                        f"{bound[(r['bw'], r['gpus'], r['method'])]:.4f}\n")
        print(f"# csv: {args.csv}")
    return 0


MATPLOTLIB_MISSING = "# matplotlib is not installed: no plot written (pip install matplotlib; --png '' skips the plot)"


def projection_figure(with_c, without, methods, gpus, bws, consts, compute_ms):
    """The projection plot (needs matplotlib): one panel per link rate, speed-up over S-SGD per method (solid:
    projection A, dotted: B). The legend sits below the panels, outside every axes, so it hides no line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    width = 4.4 * len(bws)
    n_labels = len(methods) + 2                               # one per method, and solid A / dotted B
    ncol = max(1, min(n_labels, int(width / 2.0)))            # ~2 inches per legend entry at fontsize 7
    rows = -(-n_labels // ncol)
    legend_in = 0.15 + 0.17 * rows                            # the legend's own strip below the panels
    height = 3.6 + legend_in
    fig, axes = plt.subplots(1, len(bws), figsize=(width, height), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bw in zip(axes[0], bws):
        for i, m in enumerate(methods):
            for table, style, label in ((with_c, "-", LABELS[m]), (without, ":", None)):
                xs = [n for n in gpus if (bw, n, m) in table]
                ys = [table[(bw, n, "allreduce")] / table[(bw, n, m)] for n in xs]
                ax.plot(xs, ys, style, marker="o" if style == "-" else None, color=colors[i % len(colors)],
                        label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(gpus)
        ax.set_xticklabels([str(n) for n in gpus])
        ax.set_title(f"{bw:g} Gbit/s")
        ax.set_xlabel("GPUs")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up over S-SGD (step time)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], color="black", ls="-", marker="o"), Line2D([], [], color="black", ls=":")]
    labels += ["A: CPU-measured compression", "B: compression free"]
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=7,
               frameon=False)
    import textwrap

    title = textwrap.wrap(f"cost model: alpha {consts.alpha_s * 1e6:.0f} us per hop, eta {consts.eta:.2f} "
                          f"({consts.source}); compute {compute_ms:g} ms/step", int(width * 13))
    fig.suptitle("\n".join(title), fontsize=8)
    fig.set_figheight(height + 0.14 * (len(title) - 1))
    fig.tight_layout(rect=(0.0, legend_in / fig.get_figheight(), 1.0, 1.0))  # the suptitle: tight_layout's own
    return fig


def plot(with_c, without, methods, gpus, bws, path, consts, compute_ms) -> Optional[str]:
    """Write the projection plot to ``path``; without matplotlib, one line says so (stderr) and None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(MATPLOTLIB_MISSING, file=sys.stderr)
        return None
    import matplotlib.pyplot as plt

    fig = projection_figure(with_c, without, methods, gpus, bws, consts, compute_ms)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"# plot: {path}")
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
