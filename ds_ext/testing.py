"""In-process test worlds: ``LoopbackWorld`` runs n simulated ranks in one process.

One thread per rank, a shared exchange and a barrier; sums in rank order. ``LoopbackComm`` is a
``ds_ext.comm.Communicator`` with the same metering, placement and control rules, so method arithmetic
is tested in milliseconds; the real multi-process tests (gloo through DeepSpeed) cover what is
distributed.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .comm import Communicator


class LoopbackWorld:
    """n simulated ranks in one process: ``run(fn)`` calls ``fn(comm)`` on one thread per rank."""

    def __init__(self, n: int, device="cpu"):
        self.n, self.device = n, torch.device(device)
        self._barrier = threading.Barrier(n)
        self._slots: List[Optional[torch.Tensor]] = [None] * n
        self._lock = threading.Lock()
        self._subworlds: Dict[tuple, "LoopbackWorld"] = {}
        self.calls = 0

    def _sync(self) -> None:
        self._barrier.wait()

    def _subworld(self, key: tuple) -> "LoopbackWorld":
        with self._lock:
            if key not in self._subworlds:
                self._subworlds[key] = LoopbackWorld(len(key), self.device)
            return self._subworlds[key]

    def comm(self, rank: int, meter=None) -> "LoopbackComm":
        return LoopbackComm(self, rank, meter=meter)

    def run(self, fn: Callable[["LoopbackComm"], object], meters: Optional[Sequence] = None) -> list:
        """``[fn(comm_0), ..., fn(comm_{n-1})]``; an exception on any rank breaks the barrier for the
        others and is re-raised here (the first one, by rank)."""
        results: List[object] = [None] * self.n
        errors: List[Optional[BaseException]] = [None] * self.n

        def body(r):
            try:
                results[r] = fn(self.comm(r, meters[r] if meters else None))
            except BaseException as e:  # noqa: BLE001 -- re-raised below
                errors[r] = e
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(r,), name=f"loopback-rank{r}") for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]
        return results


class LoopbackComm(Communicator):
    """A ``Communicator`` over a ``LoopbackWorld``: the same metering, placement and control rules,
    collectives computed in rank order."""

    def __init__(self, world: LoopbackWorld, rank: int, meter=None, wire_dtype=None):
        self.world = world
        self.group = None
        self.meter = meter
        self.device = world.device
        self.wire_dtype = wire_dtype
        self.world_size, self.rank, self.global_rank = world.n, rank, rank
        self._init_state()

    def _exchange(self, t: torch.Tensor) -> List[torch.Tensor]:
        w = self.world
        w._slots[self.rank] = t.detach().clone()
        w._sync()
        got = list(w._slots)
        w._sync()  # nobody overwrites a slot before everyone has read it
        return got

    def _all_reduce(self, t, op, async_op, kind):
        got = self._exchange(t)
        acc = got[0].clone()
        for x in got[1:]:
            if op == "sum":
                acc.add_(x)
            elif op == "max":
                torch.maximum(acc, x, out=acc)
            else:
                torch.minimum(acc, x, out=acc)
        t.copy_(acc)
        return None

    def _all_gather(self, out, t, async_op, kind):
        for r, x in enumerate(self._exchange(t)):
            out[r].copy_(x.view_as(out[r]))
        return None

    def _broadcast(self, t, src, kind):
        t.copy_(self._exchange(t)[src])

    def _barrier(self):
        self.world._sync()

    def _new_subgroup(self, key):
        self.world._sync()  # collective, as torch's new_group
        if self.rank not in key:
            return None
        return LoopbackComm(self.world._subworld(key), key.index(self.rank), meter=self.meter,
                            wire_dtype=self.wire_dtype)

    def _destroy_subgroup(self, sub) -> None:
        pass

    def _pin_store(self) -> dict:
        return self.world.__dict__.setdefault("_pinned", {}).setdefault(self.rank, {})  # per rank, as per process


class StandInEngine:
    """What ``ds_ext.attach`` and ``Attachment`` touch of a DeepSpeed engine at ZeRO stage 0, every micro-batch a
    boundary, for in-process tests: ``module``, an SGD optimizer at ``lr``, the DeepSpeed ``config`` dict (where
    ``attach`` reads the ``ds_ext`` block), ``step()`` as the engine's (optimizer step, zero grads, count)."""

    def __init__(self, module: torch.nn.Module, lr: float = 0.1, config: Optional[dict] = None):
        self.module, self.global_steps, self.enable_backward_allreduce = module, 0, True
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        self.device, self.lr_scheduler, self.config = torch.device("cpu"), None, dict(config or {})
        self.communication_data_type = torch.float32

    def zero_optimization_stage(self) -> int:
        return 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def fp16_enabled(self) -> bool:
        return False

    def gradient_accumulation_steps(self) -> int:
        return 1

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.global_steps += 1

    def save_checkpoint(self, *a, **k) -> None:
        pass

    def load_checkpoint(self, *a, **k) -> None:
        pass
