"""The typed options of every method, importable from one place (also ``from ds_ext import PowerSGDOptions``).

Each class validates a method block as a recipe or a ``ds_ext`` block in a DeepSpeed config would (unknown keys
refused, ranges checked); pass an instance to ``ds_ext.attach``::

    ds_ext.attach(engine, {"reducer": ds_ext.PowerSGDOptions(rank=4, start_powerSGD_iter=0)})
    ds_ext.attach(engine, {"order": ("cdgrab", ds_ext.DGrabOptions())}, order=...)  # (name, options): one class, two names

``python -m ds_ext.methods options NAME`` prints each class's table (option, default, meaning).
"""
from .order.dgrab import DGrabOptions
from .reducers.allreduce import AllreduceOptions
from .reducers.half import HalfOptions
from .reducers.lowrank import ACPSGDOptions, PowerSGDOptions
from .reducers.signsgd import SignSGDOptions
from .reducers.sparse import ExDynaOptions, TopKOptions
from .sync.dssync import DSSyncOptions
from .sync.averaging import LocalOptions

__all__ = ["ACPSGDOptions", "AllreduceOptions", "DGrabOptions", "DSSyncOptions", "ExDynaOptions", "HalfOptions",
           "LocalOptions", "PowerSGDOptions", "SignSGDOptions", "TopKOptions"]
