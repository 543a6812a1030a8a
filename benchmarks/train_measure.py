"""The measurement side of ``benchmarks.train`` (bench-train): pinning a rank's threads to a core, the recorder of
every collective's launch and completion, the gradient-ready clock and the timed step loop. The module docstring of
``benchmarks/train.py`` and docs/dev/notes/bench-train.md say what each timestamp means."""
from __future__ import annotations

import os
import threading
import time
from typing import List, Optional

# ------------------------------------------------------------------------------------------ pinning
def pin_threads(core: int) -> None:
    """Every thread of this process (and the threads it starts later) on ``core``."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that just ended
            pass


def thread_masks() -> List[List[int]]:
    """The distinct CPU masks of this process's threads."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            out.add(tuple(sorted(os.sched_getaffinity(int(tid)))))
        except OSError:
            pass
    return [list(m) for m in sorted(out)]


# ------------------------------------------------------------------------------------- collectives
class CollectiveRecorder:
    """Launch and completion times of every collective (module docstring): ds_ext's own through the communication
    layer's observer (``ds_ext.comm.observe``), and DDP's and DeepSpeed's own reductions, which do not pass a
    ``Communicator``, by wrapping ``torch.distributed.all_reduce`` (an all_reduce inside an observed call is not
    counted twice)."""

    def __init__(self):
        self.records: List[list] = []   # [op, payload bytes, launch, completion (None until done)]
        self.active = False
        self._local = threading.local()
        self._orig = {}
        self._remove = None

    def _note(self, op, nbytes, fn, args, kwargs, async_op):
        if not self.active or getattr(self._local, "inside", False):
            return fn(*args, **kwargs)
        rec = [op, int(nbytes), time.perf_counter(), None]
        self.records.append(rec)
        self._local.inside = True
        try:
            work = fn(*args, **kwargs)
        finally:
            self._local.inside = False
        if not async_op or work is None:
            rec[3] = time.perf_counter()
            return work
        try:
            fut = work.get_future()
        except Exception:  # a backend without futures: completion when waited for
            fut = None
        if fut is None:
            rec[3] = rec[2]
            return work

        def done(_f, rec=rec):
            rec[3] = time.perf_counter()

        fut.add_done_callback(done)
        return work

    def __call__(self, comm, op, kind, t, async_op, issue):
        """The ``Communicator`` observer: ds_ext's all_reduce and all_gather calls (broadcasts are not recorded)."""
        if op == "broadcast":
            return issue()
        return self._note(op, t.numel() * t.element_size(), issue, (), {}, async_op)

    def install(self) -> None:
        import torch.distributed as dist

        from ds_ext.comm import observe  # imports no DeepSpeed

        orig_ar = dist.all_reduce
        self._orig["all_reduce"] = orig_ar
        rec = self

        def all_reduce(tensor, *args, **kwargs):  # DDP's hooks and DeepSpeed's own reduction: not ours
            async_op = kwargs.get("async_op", args[2] if len(args) > 2 else False)
            return rec._note("all_reduce", tensor.numel() * tensor.element_size(), orig_ar, (tensor,) + args, kwargs,
                             async_op)

        dist.all_reduce = all_reduce
        self._remove = observe(self)

    def uninstall(self) -> None:
        import torch.distributed as dist

        if "all_reduce" in self._orig:
            dist.all_reduce = self._orig.pop("all_reduce")
        if self._remove is not None:
            self._remove()
            self._remove = None

    def take(self) -> List[list]:
        out, self.records = self.records, []
        return out


class ReadyClock:
    """``post_accumulate_grad`` hooks on every parameter: when each gradient was ready (and the main thread's CPU
    time at the last one)."""

    def __init__(self, params):
        self.params = list(params)
        self.times = [0.0] * len(self.params)
        self.last = 0.0
        self.last_cpu = 0.0
        self.last_proc = 0.0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i):
        def hook(_p):
            t = time.perf_counter()
            self.times[i] = t
            if t > self.last:
                self.last, self.last_cpu, self.last_proc = t, time.thread_time(), time.process_time()
        return hook

    def reset(self):
        self.times = [0.0] * len(self.params)
        self.last = 0.0

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _loop(step_parts, clock: ReadyClock, recorder: Optional[CollectiveRecorder], n: int) -> List[dict]:
    """``n`` steps of ``step_parts = (forward -> loss, backward(loss), step())``; one sample per step."""
    fwd, bwd, opt_step = step_parts
    samples = []
    for _ in range(n):
        clock.reset()
        if recorder is not None:
            recorder.take()
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        loss = fwd()
        t1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
        bwd(loss)
        t2, c2, p2 = time.perf_counter(), time.thread_time(), time.process_time()
        opt_step()
        t3, c3, p3 = time.perf_counter(), time.thread_time(), time.process_time()
        ready = clock.last if clock.last > 0 else t2
        ready_cpu = clock.last_cpu if clock.last > 0 else c2
        ready_proc = clock.last_proc if clock.last > 0 else p2
        colls = recorder.take() if recorder is not None else []
        ms = lambda t: 1e3 * (t - t0)  # noqa: E731
        samples.append({
            "t_fwd": ms(t1), "t_ready": ms(ready), "t_bwd": ms(t2), "t_end": ms(t3),
            "cpu_fwd": 1e3 * (c1 - c0), "cpu_bwd": 1e3 * (ready_cpu - c1), "cpu_tail": 1e3 * (c3 - ready_cpu),
            "cpu_process": 1e3 * (p3 - p0), "loss": float(loss.detach()),
            # CPU of the process's other threads (gloo's: sockets, reductions, future callbacks) in each phase
            "other_fwd": 1e3 * ((p1 - p0) - (c1 - c0)), "other_bwd": 1e3 * ((ready_proc - p1) - (ready_cpu - c1)),
            "other_tail": 1e3 * ((p3 - ready_proc) - (c3 - ready_cpu)),
            "ready_frac": ([(t - t1) / (ready - t1) if ready > t1 and t > 0 else 1.0 for t in clock.times]
                           if recorder is None else None),
            "colls": [[op, b, ms(a), ms(d if d is not None else t3)] for op, b, a, d in colls]})
    return samples
