"""The one roster of the methods the cost model prices and the benchmarks run, and their settings:
labels, the options each method is modelled and benchmarked with (``method_specs``), which have a hierarchical
mode, which overlap with backward, and the compression times built in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


# ---------------------------------------------------------------------------------------- methods
# name -> (reducer name, reducer options, sync name, sync options, launched during backward, label)
# ``{rank}``, ``{density}`` ... are filled from the options of ``method_specs``.
LABELS = {
    "allreduce": "S-SGD (allreduce)",
    "powersgd": "PowerSGD",
    "acpsgd": "ACP-SGD",
    "topk": "top-k",
    "exdyna": "ExDyna",
    "signsgd": "EF-SignSGD",
    "local_qsr": "Local SGD + QSR",
    "dssync": "DS-Sync",
}


ALL_METHODS = tuple(LABELS)


OVERLAPS_BACKWARD = {"allreduce", "acpsgd"}


@dataclass
class MethodOptions:
    """The settings the issue fixes (rank 4, density 0.001, one QSR period, 2 DS-Sync groups)."""
    rank: int = 4
    density: float = 0.001
    qsr_alpha: float = 0.0175      # the QSR ViT-B recipe's alpha ...
    qsr_lr: float = 0.008          # ... at its peak learning rate:
    qsr_h_base: int = 4            # H = max(4, floor((0.0175 / 0.008)^2)) = 4
    dssync_groups: int = 2
    bucket_mb: float = 25.0

    @property
    def qsr_h(self) -> int:
        return max(self.qsr_h_base, int((self.qsr_alpha / self.qsr_lr) ** 2))


def method_specs(opts: MethodOptions) -> Dict[str, Tuple[str, dict, str, dict]]:
    """(reducer, reducer options, sync, sync options) per method, as ``ds_ext.deepspeed.attach.attach`` takes them."""
    return {
        "allreduce": ("allreduce", {"bucket_mb": opts.bucket_mb}, "none", {}),
        "powersgd": ("powersgd", {"rank": opts.rank, "start_powerSGD_iter": 0}, "none", {}),
        "acpsgd": ("acpsgd", {"rank": opts.rank}, "none", {}),
        "topk": ("topk", {"density": opts.density}, "none", {}),
        "exdyna": ("exdyna", {"density": opts.density}, "none", {}),
        "signsgd": ("signsgd", {}, "none", {}),
        "local_qsr": ("none", {}, "local", {"period": "qsr", "alpha": opts.qsr_alpha, "h_base": opts.qsr_h_base}),
        "dssync": ("none", {}, "dssync", {"groups": opts.dssync_groups, "grouping": "patterns", "h": 1}),
    }


def applicable(method: str, n: int, opts: MethodOptions) -> Optional[str]:
    """None, or why ``method`` cannot run on ``n`` ranks."""
    if method == "dssync" and n % opts.dssync_groups:
        return f"{opts.dssync_groups} groups do not divide {n} ranks"
    if method == "dssync" and n // opts.dssync_groups < 2:
        return f"{opts.dssync_groups} groups of {n} ranks have one rank each: no communication at all"
    return None


#: methods with a hierarchical mode (``hierarchical: true`` on the reducer, or on ``sync: local``)
HIER_METHODS = ("allreduce", "powersgd", "acpsgd", "topk", "exdyna", "signsgd", "local_qsr")
#: what ``python -m ds_ext.costmodel --hierarchical`` projects unless ``--methods`` says otherwise
HIER_DEFAULT_METHODS = ("allreduce", "powersgd", "acpsgd", "topk", "exdyna", "local_qsr")


# How a method's compression time changes with the number of ranks N (fitted per method on the
# N = 2, 3, 4 measurements): signsgd decodes N packed vectors and topk scatters N*k values
# (a + b N); exdyna scans 1/N of the gradient (a + b / N); the others do the same work at any N.
COMPRESS_SCALING = {"signsgd": "linear", "topk": "linear", "exdyna": "inverse"}


@dataclass
class Compression:
    """Compression ms per step of one method: ``a + b * f(N)`` with f = 1, N or 1/N."""
    form: str = "constant"
    a: float = 0.0
    b: float = 0.0

    def at(self, n: int) -> float:
        f = {"constant": 0.0, "linear": float(n), "inverse": 1.0 / n}[self.form]
        return self.a + self.b * f


DEFAULT_COMPRESSION: Dict[str, Compression] = {
    "allreduce": Compression("constant", 58.6),
    "powersgd": Compression("constant", 90.6),
    "acpsgd": Compression("constant", 68.0),
    "topk": Compression("constant", 447.1),       # a + b N fitted a negative slope: constant
    "exdyna": Compression("inverse", 41.4, 52.6),
    "signsgd": Compression("linear", 317.8, 96.9),
    "local_qsr": Compression("constant", 25.0),
    "dssync": Compression("constant", 92.3),
}


#: PyTorch DDP, the peer bench-train runs beside us (``benchmarks.train``)
DDP_METHODS = ("ddp_allreduce", "ddp_powersgd")


TRAIN_METHODS = tuple(ALL_METHODS) + ("deepspeed",) + DDP_METHODS


# ----------------------------------------------------------------------------- model check against bench-train
#: collectives that run after backward with nothing to overlap: their measured in-flight time calibrates the
#: network constants of the check (the overlap term is then tested on the others)
SERIAL_TRAIN_METHODS = ("powersgd", "topk", "exdyna", "signsgd", "local_qsr", "dssync", "deepspeed", "ddp_powersgd")


#: methods whose compression runs on the communication threads: PyTorch's powerSGD_hook orthogonalises P, computes
#: Q and decompresses in future callbacks, which gloo runs on its own threads (between its collectives)
CALLBACK_COMPRESSION = ("ddp_powersgd",)
