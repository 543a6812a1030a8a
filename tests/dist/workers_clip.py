"""``method.clip`` (tests/dist/test_clip.py): functions run inside spawned ranks."""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from .workers import flat_params, make_engine, rank_batches, tiny_model

LR, CLIP, DENSITY = 0.05, 0.05, 0.05


def _coef(g: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s factor at threshold CLIP (torch and DeepSpeed: max / (norm + 1e-6), at most 1)."""
    return torch.clamp(CLIP / (g.norm() + 1e-6), max=1.0)


def _topk(g: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(g)
    idx = g.abs().topk(k).indices
    out[idx] = g[idx]
    return out


def expected(local: torch.Tensor, world: int, reducer: str, mode: str) -> torch.Tensor:
    """The exact applied gradient of one step from every rank's local gradient (rows of ``local``)."""
    k = max(1, int(DENSITY * local.shape[1]))
    comp = (lambda g: g) if reducer == "allreduce" else (lambda g: _topk(g, k))
    if mode == "before":
        return sum(comp(g * _coef(g)) for g in local) / world
    mean = sum(comp(g) for g in local) / world
    return mean * _coef(mean)


def one_step(rank: int, world: int) -> dict:
    """One SGD step (momentum buffer empty: update = lr x applied gradient) per (reducer, clip mode), with
    DeepSpeed's gradient_clipping at CLIP; every rank's local gradient from a plain copy of the model, gathered.
    Also: the threshold DeepSpeed holds while attached and after detach, and the refusal for reducer deepspeed."""
    import torch.distributed as dist

    import ds_ext

    x, y = next(iter(rank_batches(rank, 1, 8, torch.float32)))
    ref = tiny_model()
    F.cross_entropy(ref(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    rows = [torch.zeros_like(g) for _ in range(world)]
    dist.all_gather(rows, g)
    local = torch.stack(rows)
    p0 = torch.cat([p.detach().reshape(-1) for p in tiny_model().parameters()])
    out = {}
    for reducer in ("allreduce", "topk"):
        spec = {"name": reducer} if reducer == "allreduce" else {"name": "topk", "density": DENSITY}
        for mode in ("after", "before"):
            engine = make_engine("fp32", 1, world=world, lr=LR, clip=CLIP)
            att = ds_ext.attach(engine, {"reducer": spec, "clip": mode})
            during = engine.gradient_clipping()
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
            applied = (p0 - flat_params(engine)) / LR
            att.detach()
            out[(reducer, mode)] = {"applied": applied, "expected": expected(local, world, reducer, mode),
                                    "during": during, "after_detach": engine.gradient_clipping()}
            engine.destroy()
            gc.collect()
    engine = make_engine("fp32", 1, world=world, clip=CLIP)
    try:
        ds_ext.attach(engine, {"reducer": "deepspeed", "clip": "before"})
        out["refused"] = None
    except ValueError as e:
        out["refused"] = str(e)
    engine.destroy()
    return out
