"""The method lists the parametrized tests walk, read from the registries (never typed out by hand): a new method
is covered by every matrix that applies to it (``tests/unit/test_roster.py`` checks the matrices use these).
A matrix may keep small-scale options for the tiny test model per method; a method without an entry there runs
with its own defaults."""
from __future__ import annotations

from typing import List

from ds_ext.registry import ORDERS, REDUCERS, SYNCS, load_builtin

load_builtin()


def reducer_class(name: str):
    return REDUCERS.get(name).factory


def exchanging_reducers() -> List[str]:
    """Reducers that replace DeepSpeed's allreduce with their own per-step gradient exchange (no microbatch
    observation): the ones that run under ZeRO 1/2, under the comms logger, and on their own in a matrix."""
    return [n for n in REDUCERS.names() if reducer_class(n).replaces_engine_allreduce
            and reducer_class(n).communicates_gradients and not reducer_class(n).observes_microbatches]


def all_reducers() -> List[str]:
    return REDUCERS.names()


def all_syncs() -> List[str]:
    return SYNCS.names()


def all_orders() -> List[str]:
    return ORDERS.names()
