"""Rank bodies for tests/dist/test_nonfinite.py: a NaN / inf injected into one rank's batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.dist.workers import flat_params, make_engine, rank_batches


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


def _order(name, rank, world):
    if name is None:
        return None
    from ds_ext.registry import ORDERS, load_builtin

    load_builtin()
    order = ORDERS.build(name, {}, 4096, rank, world, 0)
    order.epoch_indices(0)
    return order


#: where ``inject`` puts the value (``where``): the input batch, or what a method sends, by the kind of the
#: collective that carries it (the communicator's method, the kind), poisoned on the sending rank just before
POISON = {"bucket": ("all_reduce_mean", "allreduce"), "p": ("all_reduce", "powersgd_p"),
          "q": ("all_reduce", "powersgd_q"), "acp": ("all_reduce", "acpsgd_p"),
          "topk_values": ("all_gather", "topk_values"), "sign_scales": ("all_gather", "signsgd_scales"),
          "sign_bucket": ("all_gather", "signsgd_scales", 2)}  # the 2nd signsgd bucket's scales only


def _poison(comm, where, value, now):
    """Wrap ``comm``'s collective for ``where`` (``POISON``): while ``now()``, element 0 of the tensor this rank
    sends becomes ``value`` (in every such collective of the step, or only the n-th when ``POISON`` names one)."""
    name, kind, *nth = POISON[where]
    orig = getattr(comm, name)
    seen = [0]

    def wrapped(t, k=None, *a, **kw):
        if k == kind and now():
            seen[0] += 1
            if not nth or seen[0] == nth[0]:
                t.view(-1)[0] = value
        return orig(t, k, *a, **kw)

    setattr(comm, name, wrapped)


def inject(rank, world, cases, steps=6, bad_rank=1, bad_step=3, value=float("nan"), mode="skip", where="input"):
    """For each case (label, method dict, order name, precision, gas[, ZeRO stage]): train ``steps`` optimizer
    steps with rank-specific data, poisoning rank ``bad_rank``'s input on optimizer step ``bad_step``
    (1-based; every microbatch of that window), or with ``where`` another place (``POISON``, or ``residual``:
    element 7 of the flat reducers' error-feedback vector before that step). Record parameters after every
    step, whether all reducer / sync / order state tensors are finite at the end, the skip events and the
    guard's view."""
    import ds_ext
    from ds_ext.deepspeed.step_hooks import NonFiniteError

    out = {}
    for label, method, order_name, precision, gas, *zero in cases:  # optional 6th: the ZeRO stage
        engine = make_engine(precision, gas, world=world, zero=zero[0] if zero else 0)
        order = _order(order_name, rank, world)
        att = ds_ext.attach(engine, method, order=order, nonfinite=mode, total_steps=steps)
        dtype = next(engine.module.parameters()).dtype
        record, err, at = [], None, [0]
        if where in POISON and rank == bad_rank:
            _poison(att.comm, where, value, lambda: at[0] == bad_step)
        try:
            for i, (x, y) in enumerate(rank_batches(rank, steps * gas, 8, dtype)):
                step = at[0] = i // gas + 1
                if rank == bad_rank and step == bad_step and where == "input":
                    x = x * value
                if rank == bad_rank and step == bad_step and where == "residual" and (i + 1) % gas == 0:
                    att.reducer.error[7] = value
                loss = F.cross_entropy(engine(x).float(), y)
                engine.backward(loss)
                engine.step()
                if (i + 1) % gas == 0:
                    record.append(flat_params(engine))
        except NonFiniteError as e:
            err = str(e)
        states = [att.reducer.state_dict(), att.sync.state_dict(), order.state_dict() if order is not None else {}]
        finite = all(bool(torch.isfinite(t.float()).all()) for s in states for t in _state_tensors(s)
                     if t.is_floating_point())
        out[label] = {"record": record, "finite_state": finite, "events": list(att.nonfinite_events),
                      "skipped": att.skipped_steps, "error": err, "view": att.guard.view,
                      "microbatches": att.guard.microbatches}
        att.detach()
    return out


def swapped_elements(rank, world):
    """Rank 1 swaps two elements of one parameter (sum, sum of squares and first element unchanged):
    the runtime consistency check must still name that parameter."""
    from ds_ext.deepspeed.step_hooks import DesyncError, check_consistency

    engine = make_engine("fp32", 1, world=world)
    check_consistency(engine.module, step=0)  # identical at start: no error
    w = dict(engine.module.named_parameters())["3.weight"]
    if rank == 1:
        with torch.no_grad():
            a, b = w.view(-1)[5].clone(), w.view(-1)[9].clone()
            w.view(-1)[5], w.view(-1)[9] = b, a
    try:
        check_consistency(engine.module, step=7)
    except DesyncError as e:
        return str(e)
    return None
