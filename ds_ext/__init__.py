"""ds_ext: communication-efficient data-parallel training methods as DeepSpeed plug-ins.

Public API::

    recipe = ds_ext.load_recipe("recipes/quickstart.yaml", overrides=["train.epochs=2"])
    engine, attachment, schedule = ds_ext.initialize(recipe, model, steps_per_epoch)
    # or, with your own deepspeed.initialize(...) and loop:
    attachment = ds_ext.attach(engine, {"reducer": {"name": "allreduce", "bucket_mb": 25}})

Typed method options (``PowerSGDOptions``, ``TopKOptions``, ...): ``ds_ext.options``, also importable from here.
Registries (``REDUCERS``, ``SYNCS``, ``ORDERS``, ``MODELS``, ``DATASETS``, ``OPTIMIZERS``) map
recipe names to implementations. Importing ds_ext does not import deepspeed.
"""
__version__ = "0.1.0"

from .registry import DATASETS, MODELS, OPTIMIZERS, ORDERS, REDUCERS, SYNCS, load_builtin  # noqa: F401
# the built-in plugins register themselves on import (the registries live in registry.py, which imports none)
from . import data, models, order, reducers, sync  # noqa: F401,E402
from .trainer import optim  # noqa: F401,E402
from .trainer.recipe import Recipe, RecipeError, load_recipe  # noqa: F401
from . import options  # noqa: F401,E402
from .options import *  # noqa: F401,F403,E402  (the typed method options: ds_ext.PowerSGDOptions, ...)


def initialize(recipe, model, steps_per_epoch, meter=None, order=None):
    from .trainer.setup import initialize as _initialize

    return _initialize(recipe, model, steps_per_epoch, meter, order=order)


def attach(engine, method=None, meter=None, group=None, check_every=0, total_steps=None, order=None,
           nonfinite="skip", check=True, steps_per_epoch=None):
    """Attach ds_ext's communication methods to a DeepSpeed engine; your training loop stays as it is.

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize`` (ZeRO stage 0, 1 or 2).
        method: what to run. None (default) reads the ``"ds_ext"`` block of the engine's DeepSpeed config
            (no block: plain allreduce; a misspelled one such as ``"ds-ext"`` is an error naming the key). Or a
            dict of ``reducer`` / ``sync`` / ``order`` blocks, each a name (``"powersgd"``), a dict
            (``{"name": "powersgd", "rank": 4}``) or a typed options object (``ds_ext.PowerSGDOptions(rank=4)``,
            see ``ds_ext.options``). A bad block raises ``ds_ext.RecipeError`` (a ``ValueError``) naming the key and
            what is allowed.
        meter: a ``ds_ext.meter.CommMeter`` to count bytes into (default: a new one, ``attachment.meter``).
        group: the data-parallel process group (default: the world).
        check_every: every this many steps, check that all ranks hold the same parameters (0: never).
        total_steps: the run's optimizer steps, when known: period schedules end their last round on it, and a
            plain-allreduce warm-up that covers the whole run (PowerSGD's ``start_powerSGD_iter``) is a warning.
        order: the data order object driving your sampler, for a gradient-driven order (``dgrab``).
        nonfinite: ``"skip"`` (a NaN/inf gradient on any rank skips the step everywhere), ``"raise"`` or ``"off"``.
        check: run the methods' compatibility rules on this engine (ZeRO stage, precision, combinations).
        steps_per_epoch: optimizer steps per epoch, for a synchronizer that needs epoch boundaries.

    Returns:
        An ``Attachment``; keep it. ``attachment.summary()`` is a readable account of the bytes sent per rank (in
        total and per step, by kind), ``attachment.meter`` the counts, ``attachment.description`` the lines rank 0
        logged at attach, one per method (what it compresses, bytes per step, when compression starts).
        While attached, ``engine.save_checkpoint`` / ``load_checkpoint`` also keep every rank's method state.

    Example::

        ds_config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16,
                     "ds_ext": {"reducer": {"name": "powersgd", "rank": 4, "start_powerSGD_iter": 0}}}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        attachment = ds_ext.attach(engine)  # rank 0 logs "powersgd rank 4: N of M tensors compressed, ~.../step ..."
        for x, y in loader:
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
        print(attachment.summary())

    Run it under the launcher (``deepspeed --num_gpus 2 train.py``); at world size 1 nothing is communicated. The
    full reference: ``ds_ext.deepspeed.attach.attach``.
    """
    from .deepspeed.attach import attach as _attach

    return _attach(engine, method, meter=meter, group=group, check_every=check_every, total_steps=total_steps,
                   order=order, nonfinite=nonfinite, check=check, steps_per_epoch=steps_per_epoch)
