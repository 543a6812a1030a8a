"""``python -m ds_ext.report``: the state of ds_ext's compiled ops, like DeepSpeed's ``ds_report``.

For each op (``ds_ext/op_builder``): whether it can be built here (and why not), whether a prebuilt
module is installed, whether a JIT build is on disk, and which implementation ``ds_ext.ops`` uses
for that device now (compiled / torch fallback, with the reason); then torch, CUDA and DeepSpeed
versions and the ``DS_EXT_OPS`` / ``DS_BUILD_*`` / ``TORCH_CUDA_ARCH_LIST`` settings.

``--load`` loads (JIT-builds if needed) every compatible op so "in use" is what a run would get;
without it nothing is built and an op not loaded yet shows ``not loaded yet``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def rows(load: bool = False) -> List[dict]:
    import torch
    from . import ops
    from .op_builder import BUILDERS, build_requested
    out = []
    for dev, cls in BUILDERS.items():
        b = cls()
        compatible = b.is_compatible()
        prebuilt = b.prebuilt_module() is not None
        try:
            jit = b.jit_cached()
        except Exception:
            jit = False
        present = dev == "cpu" or (dev == "cuda" and torch.cuda.is_available())
        if present:
            st = ops.status(dev, load=load and compatible)
            if not compatible and st["mode"] != "torch":
                st = {"mode": st["mode"], "in_use": "torch", "how": f"not compatible: {b.error_log}"}
        else:
            st = {"mode": ops.mode(), "in_use": "-", "how": f"no {dev} device"}
        out.append({"op": b.NAME, "device": dev, "compatible": compatible,
                    "reason": "" if compatible else b.error_log, "prebuilt": prebuilt,
                    "prebuilt_note": "" if prebuilt else (b.prebuilt_problem or ""),
                    "build_var": f"{b.BUILD_VAR}={_yn(build_requested(b.BUILD_VAR))}",
                    "jit_built": jit, "in_use": st["in_use"], "how": st["how"]})
    return out


def report(load: bool = False) -> str:
    import torch
    import deepspeed
    lines = ["ds_ext op report", "-" * 100]
    lines.append(f"{'op':<18} {'compatible':<11} {'prebuilt':<9} {'JIT-built':<10} {'in use':<16} detail")
    for r in rows(load):
        detail = r["how"] or r["reason"]
        in_use = r["in_use"] if r["in_use"] != "torch" else "torch fallback"
        lines.append(f"{r['op']:<18} {_yn(r['compatible']):<11} {_yn(r['prebuilt']):<9} {_yn(r['jit_built']):<10} "
                     f"{in_use:<16} {detail}")
        if not r["compatible"]:
            lines.append(f"{'':<18} reason: {r['reason']}")
    lines.append("-" * 100)
    lines.append(f"torch version ....... {torch.__version__}")
    lines.append(f"torch CUDA .......... {torch.version.cuda} (available: {torch.cuda.is_available()})")
    try:
        from deepspeed.ops.op_builder.builder import installed_cuda_version
        nvcc = "%d.%d" % installed_cuda_version()
    except Exception as e:
        nvcc = f"none ({type(e).__name__})"
    lines.append(f"nvcc (CUDA_HOME) .... {nvcc}")
    lines.append(f"deepspeed version ... {deepspeed.__version__}")
    lines.append(f"DS_EXT_OPS .......... {os.environ.get('DS_EXT_OPS', 'auto (unset)')}")
    lines.append(f"DS_BUILD_OPS ........ {os.environ.get('DS_BUILD_OPS', '(unset)')}")
    lines.append(f"TORCH_CUDA_ARCH_LIST  {os.environ.get('TORCH_CUDA_ARCH_LIST', '(unset)')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", action="store_true", help="load (JIT-build if needed) the compatible ops first")
    a = ap.parse_args(argv)
    print(report(load=a.load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
