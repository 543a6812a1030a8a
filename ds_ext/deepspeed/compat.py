"""DeepSpeed against a newer torch: the collectives DeepSpeed's torch backend picks.

DeepSpeed's ``TorchBackend`` binds ``torch.distributed.all_gather_into_tensor`` and ``reduce_scatter_tensor`` once,
at start-up (``get_all_gather_function`` / ``get_reduce_scatter_function``). torch deprecates both in favour of
``all_gather_single`` / ``reduce_scatter_single`` (the deprecated names now only forward to them, with a
``FutureWarning`` at every new call site), so every run printed the warning for ds_ext's control exchange, which
goes through ``deepspeed.comm.all_gather_into_tensor`` (``ds_ext/comm.py``). ``quiet_all_gather`` binds the
backend to the functions the deprecated names forward to: the same collective, the same arguments, DeepSpeed's
comms logger still sees the calls under their names. It changes nothing on a torch without the new names or when
DeepSpeed bound something else (its ROCm path, an older torch's ``_all_gather_base``).
"""
from __future__ import annotations

import sys

#: DeepSpeed backend attribute -> (the deprecated torch function it may hold, the torch function to hold instead)
_REPLACEMENTS = {"all_gather_function": ("all_gather_into_tensor", "all_gather_single"),
                 "reduce_scatter_function": ("reduce_scatter_tensor", "reduce_scatter_single")}


def quiet_all_gather() -> list:
    """Rebind DeepSpeed's backend (module docstring) when it was initialised; returns the attributes changed."""
    comm = sys.modules.get("deepspeed.comm.comm")
    cdb = getattr(comm, "cdb", None)
    if cdb is None:
        return []
    import torch.distributed as dist

    changed = []
    for attr, (old, new) in _REPLACEMENTS.items():
        now = getattr(cdb, attr, None)
        if now is not None and now is getattr(dist, old, None) and callable(getattr(dist, new, None)):
            setattr(cdb, attr, getattr(dist, new))
            changed.append(attr)
    return changed
