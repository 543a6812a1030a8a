"""Non-finite guard micro-benchmark (not a test): ``python -m benchmarks.guard [--threads 1] [--reps 20]``.

CPU time per optimizer step of the guard on ResNet-50's parameter shapes (ImageNet, 1000 classes: 161 tensors,
25.6M fp32 elements), torch only, no DeepSpeed and no process group. Every row runs on the same tensors in the
same process, median of ``--reps`` runs, one thread by default (each training rank is pinned to one core):

* ``old: screen (per parameter)``  what the hooks ran per gradient before issue 29: ``inf``-norm, ``isfinite``,
  ``~``, ``masked_fill_`` on each of the 161 gradients, then the flags stacked;
* ``old: _result_flag``  the second pass after the reducer: ``_foreach_norm(inf)`` over every reduced gradient;
* ``old: total``  the two together (the control all_gather it also added is not counted here);
* ``new <method>``  what the guard checks now (``ds_ext.reducers.base.any_nonfinite``): the reduced S-SGD
  buckets (25 MiB, the whole gradient once), PowerSGD's all-reduced P and Q buffers (rank 1, 1-D tensors in
  the P buffer), ACP-SGD's P buffer (rank 4), top-k's gathered values (2 ranks, density 0.001), signsgd's
  gathered scales, ExDyna's local ``grad + e`` (the whole vector, once), the local check of every gradient
  (hierarchical wrappers, local steps).

The S-SGD and ExDyna rows read the whole gradient once (the floor for a check of data that large); the
low-rank and sparse rows read kilobytes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List, Tuple

import torch


def resnet50_shapes(classes: int = 1000) -> List[Tuple[int, ...]]:
    """torchvision's ResNet-50 v1.5 trainable parameter shapes, in registration order."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            width, out = planes, planes * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    return shapes + [(classes, 2048), (classes,)]


def old_screen(grads: List[torch.Tensor]) -> torch.Tensor:
    bad = []
    for g in grads:
        b = ~torch.isfinite(torch.linalg.vector_norm(g, float("inf")))
        g.masked_fill_(b, 0)
        bad.append(b)
    return torch.stack(bad).any()


def old_result_flag(grads: List[torch.Tensor]) -> torch.Tensor:
    return ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))).float()).all()


def median_ms(fn: Callable[[], torch.Tensor], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        bool(fn())  # the host read the guard makes once per step
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ds_ext.reducers.base import any_nonfinite

    shapes = resnet50_shapes()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    numel = sum(g.numel() for g in grads)
    cap = 25 * 2 ** 20 // 4  # S-SGD buckets of 25 MiB (fp32), reverse order
    buckets, cur = [], 0
    for g in reversed(grads):
        if cur and cur + g.numel() > cap:
            buckets.append(cur)
            cur = 0
        cur += g.numel()
    buckets.append(cur)
    flat = torch.cat([g.reshape(-1) for g in grads])
    bucket_bufs = list(flat.split(buckets))

    def factors(r):
        p = sum(s[0] * min(r, s[0]) for s in shapes if len(s) > 1)
        q = sum((torch.Size(s).numel() // s[0]) * min(r, s[0]) for s in shapes if len(s) > 1)
        plain = sum(s[0] for s in shapes if len(s) == 1)
        return torch.randn(p + plain, generator=gen), torch.randn(q, generator=gen)

    p1, q1 = factors(1)
    p4, _ = factors(4)
    k = max(1, int(0.001 * numel))
    topk_vals = torch.randn(2, k, generator=gen)
    sign_scales = torch.rand(2, len(shapes), generator=gen)
    rows = [
        ("old: screen (per parameter)", lambda: old_screen(grads)),
        ("old: _result_flag", lambda: old_result_flag(grads)),
        ("new allreduce / half: reduced buckets", lambda: any_nonfinite(bucket_bufs)),
        ("new powersgd: P + Q buffers (rank 1)", lambda: any_nonfinite([p1, q1])),
        ("new acpsgd: P buffer (rank 4)", lambda: any_nonfinite([p4])),
        ("new topk: gathered values (2 ranks)", lambda: any_nonfinite([topk_vals])),
        ("new signsgd: gathered scales", lambda: any_nonfinite([sign_scales])),
        ("new exdyna: local grad + e (one vector)", lambda: any_nonfinite([flat])),
        ("new local view: every gradient (fused)", lambda: any_nonfinite(grads)),
    ]
    print(f"ResNet-50: {len(shapes)} tensors, {numel / 1e6:.1f}M fp32 elements, {len(buckets)} buckets; "
          f"{args.threads} thread(s), median of {args.reps}")
    got = {}
    for name, fn in rows:
        got[name] = median_ms(fn, args.reps)
        print(f"  {name:<44} {got[name]:8.2f} ms/step")
    old = got["old: screen (per parameter)"] + got["old: _result_flag"]
    print(f"  {'old: total':<44} {old:8.2f} ms/step")
    new = got["new allreduce / half: reduced buckets"]
    print(f"  S-SGD: new / old = {new / old:.3f} ({old - new:.1f} ms/step saved)")


if __name__ == "__main__":
    main()
