"""Compression cost of the gradient reducers on a real model's gradient shapes (``run/bench-compress.sh``).

    python -m benchmarks.compress [--model resnet50] [--rank 4] [--steps 5] [--dtype fp32|bf16|fp16]
                                    [--device auto|cpu|cuda] [--no-torch-hooks] [--fresh-grads]

One process, world size 1 (gloo on CPU, NCCL on CUDA), so no network is involved: what is timed is
the work a reducer adds to a step -- packing, compression, orthogonalisation, decompression, error
feedback -- plus a world-1 collective. Rows:

* ``copy``: every gradient copied into a preallocated flat buffer (``torch.cat(out=)``) and back: the
  floor any fused reducer pays.
* ``allreduce`` (S-SGD), ``powersgd``, ``acpsgd``: ours, driven exactly as the engine drives them
  (``grad_ready`` for every parameter in reverse order, then ``finish``), on fixed random gradients.
  Before each step the gradients are written into the existing ``p.grad`` (as a backward after
  ``zero_grad(set_to_none=False)`` accumulates). ``allreduce`` is the copy path (``bucket_view: false``: copied
  into its buckets and back); ``allreduce_view`` has ``bucket_view: true`` (issue 19; the default since issue 29):
  the gradients are views into its buckets, so it copies nothing. ``--fresh-grads`` gives every ``p.grad`` a new tensor instead, as
  DeepSpeed's ``zero_grad`` (set to None after every step) leaves them: then the view path copies each
  gradient into its bucket once.
* ``torch powerSGD_hook`` / ``torch batched_powerSGD_hook`` / ``torch allreduce_hook``: PyTorch DDP
  comm hooks at the same rank, timed inside a wrapper hook (call + ``future.wait()``) during a real
  DDP backward on a tiny input; a hook that raises is reported as crashed with its message.

Times are medians over ``--steps`` timed steps after ``--warmup`` steps. Bytes are the payload handed
to collectives per step (our meter; for torch hooks the size of the tensors they allreduce).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], before: Callable[[], None], steps: int, warmup: int,
               device: torch.device) -> float:
    times = []
    for i in range(warmup + steps):
        before()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _ensure_pg(device: torch.device) -> None:
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from ds_ext.registry import MODELS, load_builtin

    load_builtin()
    torch.manual_seed(0)
    return MODELS.build(name, {}).to(device=device, dtype=dtype)


def bench_ours(model, method: str, options: dict, steps: int, warmup: int, device,
               fresh_grads: bool = False) -> Dict[str, float]:
    from ds_ext.meter import CommMeter
    from ds_ext.registry import REDUCERS

    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype) for p in params]
    meter = CommMeter()
    red = REDUCERS.build(method, options, list(model.named_parameters()), meter=meter)

    handed: list = []  # --fresh-grads: the tensors handed over, freed before the next step (untimed)

    def before():
        handed.clear()
        for p, g in zip(params, grads):
            if p.grad is None or fresh_grads:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if fresh_grads:
            handed.extend(p.grad for p in params)

    sent = []

    def step():
        for p in reversed(params):
            red.grad_ready(p)
        red.finish()
        sent.append(meter.end_step())

    ms = _median_ms(step, before, steps, warmup, device)
    last = sent[-2 * (len(sent) // 2):]  # an even number of steps: ACP-SGD alternates P and Q
    return {"ms": ms, "bytes": sum(last) / len(last)}


def bench_copy(model, steps: int, warmup: int, device) -> Dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn(p.shape, device=device).to(p.dtype) for p in params]

    flat = torch.empty(sum(g.numel() for g in grads), device=device, dtype=grads[0].dtype)

    def step():
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    ms = _median_ms(step, lambda: None, steps, warmup, device)
    return {"ms": ms, "bytes": sum(g.numel() * g.element_size() for g in grads)}


def bench_torch_hook(model, hook_name: str, rank: int, steps: int, warmup: int, device, input_shape,
                     batch: int) -> Dict[str, float]:
    """Time a PyTorch DDP comm hook inside a wrapper hook during real DDP backward passes."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ph
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if hook_name == "allreduce_hook":
        state, hook = None, default_hooks.allreduce_hook
    else:
        state = ph.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                 min_compression_rate=2, use_error_feedback=True, warm_start=True)
        hook = getattr(ph, hook_name)
    acc = {"ms": 0.0, "bytes": 0.0}

    def wrapper(st, bucket):
        _sync(device)
        t0 = time.perf_counter()
        out = hook(st, bucket).wait()
        _sync(device)
        acc["ms"] += (time.perf_counter() - t0) * 1e3
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut

    ddp.register_comm_hook(state, wrapper)
    x = torch.randn(batch, *input_shape, device=device, dtype=next(model.parameters()).dtype)
    times = []
    # start_powerSGD_iter=2: iterations 0 and 1 are plain allreduce; time only compressed steps
    for i in range(max(warmup, 3) + steps):
        acc["ms"] = 0.0
        ddp.zero_grad(set_to_none=False)
        ddp(x).float().sum().backward()
        if i >= max(warmup, 3):
            times.append(acc["ms"])
    return {"ms": statistics.median(times), "bytes": float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compress", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--no-torch-hooks", action="store_true", help="skip the PyTorch DDP hook rows")
    ap.add_argument("--fresh-grads", action="store_true",
                    help="a new p.grad tensor before every step of ours (as DeepSpeed's zero_grad leaves them: "
                         "set to None), instead of writing into the existing one")
    ap.add_argument("--hook-input", default="3,32,32", help="C,H,W of the tiny input driving DDP backward")
    ap.add_argument("--step-ms", type=float, default=None,
                    help="a training step time (ms) to express costs as a fraction of (e.g. 30 for ResNet-50 "
                         "bf16 bs 64 on an H100)")
    args = ap.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    _ensure_pg(device)
    model = build_model(args.model, device, dtype)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"# {args.model}: {nparams:,} parameters in {len(list(model.parameters()))} tensors, {args.dtype} "
          f"gradients, device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, rank {args.rank}, median of {args.steps} "
          f"steps after {args.warmup} warm-up{', fresh p.grad every step' if args.fresh_grads else ''}", flush=True)

    rows: List[tuple] = []
    rows.append(("copy", bench_copy(model, args.steps, args.warmup, device)))
    ours = [("allreduce", "allreduce", {"bucket_view": False}),
            ("allreduce_view", "allreduce", {"bucket_view": True}),
            ("powersgd", "powersgd", {"matrix_approximation_rank": args.rank, "start_powerSGD_iter": 0}),
            ("acpsgd", "acpsgd", {"rank": args.rank})]
    for label, name, opts in ours:
        rows.append((label, bench_ours(model, name, opts, args.steps, args.warmup, device, args.fresh_grads)))
        print(f"  measured {label}", file=sys.stderr, flush=True)
    if not args.no_torch_hooks:
        shape = tuple(int(v) for v in args.hook_input.split(","))
        for hook in ("allreduce_hook", "powerSGD_hook", "batched_powerSGD_hook"):
            m = build_model(args.model, device, dtype)
            try:
                res = bench_torch_hook(m, hook, args.rank, args.steps, args.warmup, device, shape, batch=2)
            except Exception as e:  # a crashing hook is a result, not a benchmark failure
                import traceback

                where = traceback.extract_tb(e.__traceback__)[-1]
                text = str(e).strip().splitlines()[0] if str(e).strip() else ""
                msg = f"{type(e).__name__}{': ' + text if text else ''} in {where.name}() ({Path(where.filename).name}:{where.lineno})"
                res = {"ms": float("nan"), "bytes": float("nan"), "error": msg[:160]}
            rows.append((f"torch {hook}", res))
            print(f"  measured torch {hook}", file=sys.stderr, flush=True)

    base = dict(rows)
    copy_ms, ssgd_ms, ssgd_bytes = base["copy"]["ms"], base["allreduce"]["ms"], base["allreduce"]["bytes"]
    head = f"{'method':<30} {'ms/step':>9} {'x copy':>8} {'x S-SGD':>8} {'bytes/step':>12} {'bytes x S-SGD':>14}"
    if args.step_ms:
        head += f" {'% of step':>10}"
    print(head)
    for label, r in rows:
        if "error" in r:
            print(f"{label:<30} crashed: {r['error']}")
            continue
        b = r["bytes"]
        line = (f"{label:<30} {r['ms']:9.2f} {r['ms'] / copy_ms:8.2f} {r['ms'] / ssgd_ms:8.2f} "
                f"{'-' if b != b else f'{b:,.0f}':>12} {'-' if b != b or label == 'copy' else f'{b / ssgd_bytes:.4f}':>14}")
        if args.step_ms:
            line += f" {100 * r['ms'] / args.step_ms:9.1f}%"
        print(line)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
