"""ds_ext: communication-efficient data-parallel training methods as DeepSpeed plug-ins.

Public API::

    recipe = ds_ext.load_recipe("recipes/quickstart.yaml", overrides=["train.epochs=2"])
    engine, attachment, schedule = ds_ext.initialize(recipe, model, steps_per_epoch)
    # or, with your own deepspeed.initialize(...) and loop:
    attachment = ds_ext.attach(engine, {"reducer": {"name": "allreduce", "bucket_mb": 25}})

Registries (``REDUCERS``, ``SYNCS``, ``ORDERS``, ``MODELS``, ``DATASETS``, ``OPTIMIZERS``) map
recipe names to implementations. Importing ds_ext does not import deepspeed.
"""
__version__ = "0.1.0"

from .registry import DATASETS, MODELS, OPTIMIZERS, ORDERS, REDUCERS, SYNCS, load_builtin  # noqa: F401
# the built-in plugins register themselves on import (the registries live in registry.py, which imports none)
from . import data, models, order, reducers, sync  # noqa: F401,E402
from .trainer import optim  # noqa: F401,E402
from .trainer.recipe import Recipe, RecipeError, load_recipe  # noqa: F401


def initialize(recipe, model, steps_per_epoch, meter=None, order=None):
    from .trainer.setup import initialize as _initialize

    return _initialize(recipe, model, steps_per_epoch, meter, order=order)


def attach(engine, method=None, meter=None, group=None, check_every=0, total_steps=None, order=None,
           nonfinite="skip", check=True, steps_per_epoch=None):
    """``ds_ext.deepspeed.attach.attach``: the methods onto a DeepSpeed engine (``method`` None: the ds_ext block of its
    DeepSpeed config)."""
    from .deepspeed.attach import attach as _attach

    return _attach(engine, method, meter=meter, group=group, check_every=check_every, total_steps=total_steps,
                   order=order, nonfinite=nonfinite, check=check, steps_per_epoch=steps_per_epoch)

