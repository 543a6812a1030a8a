"""The one roster of the methods the cost model prices and the benchmarks run, and their settings (``PRESETS``):
labels, the reducer and synchronizer each runs with the options it is modelled and benchmarked with
(``method_specs``), whether it launches during backward, its built-in compression time and how that scales, and the
peers bench-train runs beside them (``PEERS``: DeepSpeed's own reduction, PyTorch DDP's hooks).

Every registered reducer, synchronizer and order is accounted for (``covers``): by a preset, by a peer, or by a
declaration of why the model has none (``NOT_MODELLED``). A method that has a hierarchical mode is found from its
options (a ``hierarchical`` field) and, for a reducer, ``ds_ext.hierarchy.inner_problem``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple


@dataclass
class MethodOptions:
    """The roster's settings (rank 4, density 0.001, one QSR period, 2 DS-Sync groups)."""
    rank: int = 4
    density: float = 0.001
    qsr_alpha: float = 0.0175      # the QSR ViT-B recipe's alpha ...
    qsr_lr: float = 0.008          # ... at its peak learning rate:
    qsr_h_base: int = 4            # H = max(4, floor((0.0175 / 0.008)^2)) = 4
    dssync_groups: int = 2
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0   # allreduce's first bucket (as DDP's)

    @property
    def qsr_h(self) -> int:
        return max(self.qsr_h_base, int((self.qsr_alpha / self.qsr_lr) ** 2))


@dataclass
class Compression:
    """Compression ms per step of one method: ``a + b * f(N)`` with f = 1, N or 1/N."""
    form: str = "constant"
    a: float = 0.0
    b: float = 0.0

    def at(self, n: int) -> float:
        f = {"constant": 0.0, "linear": float(n), "inverse": 1.0 / n}[self.form]
        return self.a + self.b * f



@dataclass(frozen=True)
class Preset:
    """One modelled and benchmarked method: a reducer and a synchronizer with the options the roster fixes."""
    label: str                  #: in the projection's tables and plot
    detail: str                 #: with its settings (bench-train's tables): ``str.format`` over ``MethodOptions``
    reducer: str
    sync: str
    options: Callable[[MethodOptions], Tuple[dict, dict]]   #: (reducer options, sync options)
    compression: Compression    #: built in: measured by bench-cluster on this CPU, ms per step
    scaling: str = "constant"   #: how compression scales with N when fitted (``Compression.form``)
    overlaps_backward: bool = False   #: launched during backward (the window term hides its communication)
    hierarchical_table: bool = True   #: in ``--hierarchical``'s default methods (when it has the mode)


# How a method's compression time changes with the number of ranks N (fitted per method on the N = 2, 3, 4
# measurements): signsgd decodes N packed vectors and topk scatters N*k values (a + b N); exdyna scans 1/N of the
# gradient (a + b / N); the others do the same work at any N. topk's fit had a negative slope: its built-in
# compression is a constant.
PRESETS: Dict[str, Preset] = {
    "allreduce": Preset("S-SGD (allreduce)", "S-SGD (allreduce)", "allreduce", "none",
                        lambda o: ({"bucket_mb": o.bucket_mb}, {}), Compression("constant", 58.6),
                        overlaps_backward=True),
    "powersgd": Preset("PowerSGD", "PowerSGD r{rank}", "powersgd", "none",
                       lambda o: ({"rank": o.rank, "start_powerSGD_iter": 0}, {}), Compression("constant", 90.6),
                       overlaps_backward=True),
    "acpsgd": Preset("ACP-SGD", "ACP-SGD r{rank}", "acpsgd", "none", lambda o: ({"rank": o.rank}, {}),
                     Compression("constant", 68.0), overlaps_backward=True),
    "topk": Preset("top-k", "top-k {density}", "topk", "none", lambda o: ({"density": o.density}, {}),
                   Compression("constant", 447.1), scaling="linear"),
    "exdyna": Preset("ExDyna", "ExDyna {density}", "exdyna", "none", lambda o: ({"density": o.density}, {}),
                     Compression("inverse", 41.4, 52.6), scaling="inverse"),
    "signsgd": Preset("EF-SignSGD", "EF-SignSGD", "signsgd", "none", lambda o: ({}, {}),
                      Compression("linear", 317.8, 96.9), scaling="linear", hierarchical_table=False,
                      overlaps_backward=True),
    "local_qsr": Preset("Local SGD + QSR", "Local SGD + QSR (H={qsr_h})", "none", "local",
                        lambda o: ({}, {"period": "qsr", "alpha": o.qsr_alpha, "h_base": o.qsr_h_base}),
                        Compression("constant", 25.0)),
    "dssync": Preset("DS-Sync", "DS-Sync ({dssync_groups} groups)", "none", "dssync",
                     lambda o: ({}, {"groups": o.dssync_groups, "grouping": "patterns", "h": 1}),
                     Compression("constant", 92.3)),
}


@dataclass(frozen=True)
class Peer:
    """A method bench-train runs beside the presets that the projection does not price per collective."""
    label: str
    ddp: bool = False                   #: PyTorch DDP with its own comm hook (``benchmarks.train.ddp_hook``)
    overlaps_backward: bool = False     #: launched during backward
    #: its compression runs on the communication threads: PyTorch's powerSGD_hook orthogonalises P, computes Q and
    #: decompresses in future callbacks, which gloo runs on its own threads (between its collectives)
    callback_compression: bool = False


PEERS: Dict[str, Peer] = {
    "deepspeed": Peer("DeepSpeed ZeRO-0 reduction"),
    "ddp_allreduce": Peer("DDP allreduce_hook", ddp=True, overlaps_backward=True),
    # DDP's default buckets; on gloo each bucket's call waits for the previous bucket's chain (the hook aborts
    # otherwise: benchmarks/ddp_powersgd_gloo.py)
    "ddp_powersgd": Peer("DDP powerSGD_hook r{rank}", ddp=True, overlaps_backward=True, callback_compression=True),
    "ddp_powersgd_1b": Peer("DDP powerSGD_hook r{rank}, one bucket", ddp=True, callback_compression=True),
    "ddp_fp16": Peer("DDP fp16_compress_hook", ddp=True, overlaps_backward=True),
}

#: registered methods with no preset, and why (``covers``); a family key covers every member of that family
NOT_MODELLED: Dict[Tuple[str, str], str] = {
    ("reducer", "none"): "exchanges no gradients: the presets of the synchronizers that pair with it price them",
    ("reducer", "deepspeed"): "DeepSpeed's own reduction: a peer in bench-train (PEERS), priced there as one flat "
                              "all_reduce after backward (overlap.backward_schedule)",
    ("reducer", "cdgrab"): "exchanges every microbatch gradient with its order (CD-GraB): its traffic depends on the "
                           "gradient accumulation steps, which no preset fixes",
    ("sync", "none"): "no synchronizer: the reducer presets run with it",
    ("order", "*"): "a data order changes which samples a step sees; the model prices gradient and parameter traffic",
}



def declared_presets() -> Dict[str, Preset]:
    """Presets a reducer declares on its class (``preset``: a dict with ``label``, optionally ``options`` and
    ``overlaps_backward``), so a new method is modelled and benchmarked without an edit here. Its built-in
    compression time is unmeasured until a preset here records one: 0 ms, and the label says so."""
    from ..registry import REDUCERS

    out = {}
    for name in REDUCERS.names():
        decl = getattr(REDUCERS.get(name).factory, "preset", None)
        if name in PRESETS or not decl:
            continue
        label = f"{decl['label']} (compression not measured)"
        out[name] = Preset(label, label, name, "none", lambda o, opts=dict(decl.get("options", {})): (opts, {}),
                           Compression("constant", 0.0), overlaps_backward=bool(decl.get("overlaps_backward")))
    return out


PRESETS.update(declared_presets())
LABELS: Dict[str, str] = {m: p.label for m, p in PRESETS.items()}
ALL_METHODS: Tuple[str, ...] = tuple(PRESETS)
OVERLAPS_BACKWARD = {m for m, p in PRESETS.items() if p.overlaps_backward}
COMPRESS_SCALING: Dict[str, str] = {m: p.scaling for m, p in PRESETS.items() if p.scaling != "constant"}
DEFAULT_COMPRESSION: Dict[str, Compression] = {m: p.compression for m, p in PRESETS.items()}
DDP_METHODS: Tuple[str, ...] = tuple(m for m, p in PEERS.items() if p.ddp)
TRAIN_METHODS: Tuple[str, ...] = ALL_METHODS + tuple(PEERS)
#: collectives that run after backward with nothing to overlap: their measured in-flight time calibrates the
#: network constants of bench-train's model check (the overlap term is then tested on the others)
SERIAL_TRAIN_METHODS: Tuple[str, ...] = tuple(m for m in TRAIN_METHODS if m not in OVERLAPS_BACKWARD
                                              and not (m in PEERS and PEERS[m].overlaps_backward))
CALLBACK_COMPRESSION: Tuple[str, ...] = tuple(m for m, p in PEERS.items() if p.callback_compression)


def method_specs(opts: MethodOptions) -> Dict[str, Tuple[str, dict, str, dict]]:
    """(reducer, reducer options, sync, sync options) per method, as ``ds_ext.deepspeed.attach.attach`` takes them."""
    out = {}
    for m, p in PRESETS.items():
        ropts, sopts = p.options(opts)
        out[m] = (p.reducer, ropts, p.sync, sopts)
    return out


def label_of(method: str, opts: Optional[MethodOptions] = None) -> str:
    """A preset's or peer's label with its settings (``Preset.detail``), e.g. ``PowerSGD r4``."""
    o = opts or MethodOptions()
    text = PRESETS[method].detail if method in PRESETS else PEERS[method].label
    return text.format(**o.__dict__, qsr_h=o.qsr_h)


def _registries():
    from ..registry import ORDERS, REDUCERS, SYNCS, load_builtin

    load_builtin()
    return {"reducer": REDUCERS, "sync": SYNCS, "order": ORDERS}


def covers(family: str, name: str) -> bool:
    """Whether the roster accounts for registered method ``name`` of ``family`` (reducer, sync, order): a preset
    runs it, it is a peer, or ``NOT_MODELLED`` says why not."""
    used = {"reducer": {p.reducer for p in PRESETS.values()}, "sync": {p.sync for p in PRESETS.values()}}
    return (name in used.get(family, ()) or (family == "reducer" and name in PEERS)
            or (family, name) in NOT_MODELLED or (family, "*") in NOT_MODELLED)


def uncovered() -> List[Tuple[str, str]]:
    """Registered (family, name) pairs the roster does not account for (empty when it is complete)."""
    return [(f, n) for f, reg in _registries().items() for n in reg.names() if not covers(f, n)]


def has_hierarchical_mode(method: str) -> bool:
    """A preset whose reducer can be wrapped by ``HierarchicalReducer`` (a ``hierarchical`` option and no
    ``inner_problem``) or whose synchronizer takes ``hierarchical`` (``HierarchicalAveraging``)."""
    from ..hierarchy import inner_problem

    regs = _registries()
    p = PRESETS[method]
    r, s = regs["reducer"].get(p.reducer), regs["sync"].get(p.sync)
    reducer_ok = p.reducer == "none" or ("hierarchical" in r.options.model_fields and inner_problem(r.factory) is None)
    sync_ok = p.sync == "none" or "hierarchical" in s.options.model_fields
    return reducer_ok and sync_ok and (p.reducer, p.sync) != ("none", "none")


def hier_methods() -> Tuple[str, ...]:
    """Presets with a hierarchical mode (``hierarchical: true`` on the reducer, or on the synchronizer)."""
    return tuple(m for m in PRESETS if has_hierarchical_mode(m))


def hier_default_methods() -> Tuple[str, ...]:
    """What ``python -m ds_ext.costmodel --hierarchical`` projects unless ``--methods`` says otherwise."""
    return tuple(m for m in hier_methods() if PRESETS[m].hierarchical_table)


def applicable(method: str, n: int, opts: MethodOptions) -> Optional[str]:
    """None, or why ``method`` cannot run on ``n`` ranks."""
    if method == "dssync" and n % opts.dssync_groups:
        return f"{opts.dssync_groups} groups do not divide {n} ranks"
    if method == "dssync" and n // opts.dssync_groups < 2:
        return f"{opts.dssync_groups} groups of {n} ranks have one rank each: no communication at all"
    return None
