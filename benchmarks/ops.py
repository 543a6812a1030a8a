"""Kernel benchmark (not a test): ``bash run/bench-ops.sh`` or ``python -m benchmarks.ops``.

Each compiled kernel (``DS_EXT_OPS=compiled``) against its torch fallback (``DS_EXT_OPS=torch``) and
against a plain copy of the same bytes (``dst.copy_(src)`` of the input the kernel must read), all in
the same run, median of ``--reps`` runs, on the CPU and, when available, on CUDA. Default problem:
the issue's 25.6M fp32 gradient at density 0.001 (k = 25.6k selected/gathered pairs).

* ``threshold_select``       one rank, whole vector, threshold = the |x| quantile that selects k
* ``threshold_select +EF``   the same over x + e (e never materialised)
* ``threshold_count +EF``    the count alone, a 0-d tensor on the device (no host read)
* ``threshold_select +EF count=k``  the selection sized from the known count (no host read)
* ``scatter_add_ +zero``     k pairs into a dense N vector, EF zeroed at the same indices (copy row:
                             the k indices + values)
* ``sign_pack +residual``    N values to N/8 bytes + mean|x| scale, residual written (copy: N values)
* ``sign_unpack (accumulate)``  N/8 bytes to +-scale added into N fp32 (copy: N values)
* ``sign_pack_segments +residual``  the same N values cut into ``--segments`` tensors (half of them
                             small, 64..2048 elements, like biases and norms; the rest share the
                             remainder), one call; ``sign_pack loop over segments``: the per-tensor
                             loop it replaces
* ``sign_unpack_segments (acc.)``  the inverse, scales on the device, one call
* ``pack_values gather fp16``   x[idx] -> fp16 for k indices (copy: k values)

``--build-time`` also JIT-builds the CPU op from scratch in an empty ``TORCH_EXTENSIONS_DIR`` (in a
child process) and reports the seconds. ``--devices cuda`` benchmarks the CUDA kernels only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from ds_ext import ops


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable, dev, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _in_mode(m: str, fn: Callable) -> Callable:
    def run():
        old = os.environ.get(ops.ENV)
        os.environ[ops.ENV] = m
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(ops.ENV, None)
            else:
                os.environ[ops.ENV] = old
    return run


def build_time() -> float:
    code = ("import time; t=time.time()\n"
            "from ds_ext.op_builder import CommCPUBuilder\n"
            "CommCPUBuilder().load(); print(time.time()-t)\n")
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": d}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        return float(r.stdout.strip().splitlines()[-1])


def segment_offsets(numel: int, segments: int):
    """Offsets of ``segments`` tensors covering ``numel``: half small (64..2048 elements, a fixed
    pattern), the others sharing the remainder equally."""
    small = [64 << (i % 6) for i in range(segments // 2)]
    rest = max(0, numel - sum(small))
    big = segments - len(small)
    sizes = small + [rest // big + (1 if i < rest % big else 0) for i in range(big)]
    offs = [0]
    for m in sizes:
        offs.append(min(numel, offs[-1] + m))
    return offs


def bench_device(dev: torch.device, numel: int, density: float, reps: int, segments: int = 161):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=g).to(dev)
    e = (torch.randn(numel, generator=g) * 0.1).to(dev)
    k = max(1, int(density * numel))
    sample = x[torch.randint(0, numel, (1_000_000,), generator=g).to(dev)].abs().float()
    t = float(torch.quantile(sample, 1 - density))
    idx = torch.randint(0, numel, (k,), generator=g).to(dev)
    vals = torch.randn(k, generator=g).to(dev)
    dense = torch.zeros(numel, device=dev)
    err = e.clone()
    res = torch.empty(numel, device=dev)
    packed, scale = ops.sign_pack(x)
    out_n = torch.empty(numel, device=dev)
    out_k = torch.empty(k, device=dev)
    hits = int(ops.threshold_count(x, t, error=e))
    offs = segment_offsets(numel, segments)
    seg_packed, seg_scales = ops.sign_pack_segments(x, offs)

    def pack_loop():
        for a, b in zip(offs, offs[1:]):
            ops.sign_pack(x[a:b], residual=res[a:b])

    cases = [
        ("threshold_select", lambda: ops.threshold_select(x, t), (out_n, x)),
        ("threshold_select +EF", lambda: ops.threshold_select(x, t, error=e), (out_n, x)),
        ("threshold_count +EF", lambda: ops.threshold_count(x, t, error=e), (out_n, x)),
        ("threshold_select +EF count=k", lambda: ops.threshold_select(x, t, error=e, count=hits), (out_n, x)),
        ("scatter_add_ +zero", lambda: ops.scatter_add_(dense, idx, vals, zero_in=err), (out_k, vals)),
        ("sign_pack +residual", lambda: ops.sign_pack(x, residual=res), (out_n, x)),
        ("sign_unpack (accumulate)", lambda: ops.sign_unpack(packed, scale, numel, out=dense, accumulate=True),
         (out_n, x)),
        (f"sign_pack_segments +residual T={segments}", lambda: ops.sign_pack_segments(x, offs, residual=res),
         (out_n, x)),
        (f"sign_pack loop over segments T={segments}", pack_loop, (out_n, x)),
        (f"sign_unpack_segments (acc.) T={segments}",
         lambda: ops.sign_unpack_segments(seg_packed, seg_scales, offs, dense, accumulate=True), (out_n, x)),
        ("pack_values gather fp16", lambda: ops.pack_values(x, torch.float16, indices=idx), (out_k, vals)),
    ]
    rows = []
    for name, fn, (dst, src) in cases:
        copy = timeit(lambda: dst.copy_(src), dev, reps)
        comp = timeit(_in_mode("compiled", fn), dev, reps)
        ref = timeit(_in_mode("torch", fn), dev, reps)
        rows.append((dev.type, name, comp, ref, copy))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=25_600_000)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--segments", type=int, default=161, help="tensors of the segmented sign ops (ResNet-50: 161)")
    ap.add_argument("--build-time", action="store_true", help="time a from-scratch JIT build of the CPU op")
    a = ap.parse_args(argv)
    print(f"ds_ext kernel benchmark: numel={a.numel} density={a.density} reps={a.reps} "
          f"torch threads={torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    if a.build_time:
        print(f"JIT build of ds_ext_comm_cpu from scratch: {build_time():.1f} s")
    rows = []
    for d in a.devices.split(","):
        dev = torch.device(d)
        if dev.type == "cuda" and not torch.cuda.is_available():
            print("cuda: no device, skipped")
            continue
        st = ops.prepare(dev)  # load (or build) the op before timing anything
        print(f"{dev.type} op: {st['in_use']} ({st['how']}), loaded in {st['seconds']:.2f} s")
        rows += bench_device(dev, a.numel, a.density, a.reps, a.segments)
    print(f"\n| device | kernel | compiled ms | torch ms | copy ms | torch/compiled | compiled/copy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dev, name, c, r, cp in rows:
        print(f"| {dev} | {name} | {c:.3f} | {r:.3f} | {cp:.3f} | {r / c:.1f}x | {c / cp:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
