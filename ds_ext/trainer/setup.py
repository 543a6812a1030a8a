"""Recipe -> DeepSpeed: the optimizer, the LR schedule and the DeepSpeed config from a recipe,
``deepspeed.initialize``, then ``ds_ext.deepspeed.attach.attach`` with the recipe's methods."""
from __future__ import annotations

from typing import Optional

import torch

from ..deepspeed.attach import attach
from ..spec import block_parts
from ..deepspeed.zero import _scoped_mpu, node_mpu
from ..meter import CommMeter
from ..registry import OPTIMIZERS, REDUCERS, load_builtin


def hierarchical_zero(recipe) -> bool:
    """Whether a recipe runs a hierarchical reducer under ZeRO 1/2 (``initialize`` then partitions within nodes)."""
    from ..registry import zero_stage_of

    load_builtin()
    method = recipe.method
    spec = method.get("reducer") if isinstance(method, dict) else getattr(method, "reducer", None)
    rname, ropts = block_parts(spec, "allreduce")
    ropts = REDUCERS.validated(rname, ropts)
    return bool(getattr(ropts, "hierarchical", False)) and zero_stage_of(recipe.deepspeed) in (1, 2)


def deepspeed_config(recipe, world_size: int, data_parallel: Optional[int] = None) -> dict:
    """The engine's DeepSpeed config for ``world_size`` ranks. ``data_parallel``: the ranks DeepSpeed's
    data-parallel group holds (``NodeMPU``: one node's), which its batch arithmetic counts."""
    micro, gas = recipe.batch_plan(world_size)
    # DeepSpeed clips at norm 1.0 unless told otherwise (GRADIENT_CLIPPING_DEFAULT), with one extra
    # allreduce per step; a recipe clips only when its deepspeed block sets gradient_clipping.
    cfg = {"steps_per_print": 10**12, "wall_clock_breakdown": False, "gradient_clipping": 0.0}
    cfg.update(recipe.deepspeed)
    if int((cfg.get("zero_optimization") or {}).get("stage", 0) or 0) >= 1:
        # our optimizers are torch's (SGD, AdamW, ...), which ZeRO steps like any other on its fp32 partition;
        # DeepSpeed otherwise refuses any optimizer it has not listed as tested (tests/dist/test_zero.py runs them)
        cfg.setdefault("zero_allow_untested_optimizer", True)
    batch = recipe.train.global_batch_size if data_parallel is None else micro * gas * data_parallel
    cfg.update(train_batch_size=batch, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
    return cfg


def initialize(recipe, model: torch.nn.Module, steps_per_epoch: int, meter: Optional[CommMeter] = None,
               order=None):
    """Build optimizer + LR schedule + DeepSpeed engine from a recipe and attach its methods.

    Returns ``(engine, attachment, schedule)``. ``torch.distributed`` must already be initialised
    (``deepspeed.init_distributed``)."""
    import deepspeed

    from .optim import LRSchedule

    import torch.distributed as dist

    load_builtin()
    world = dist.get_world_size()
    opt_entry = OPTIMIZERS.get(recipe.optimizer.name)
    optimizer = opt_entry.factory(model.parameters(), recipe.optimizer.options)
    schedule = LRSchedule(optimizer, recipe.schedule, recipe.optimizer.options.lr, steps_per_epoch,
                          recipe.train.epochs)
    mpu = node_mpu() if hierarchical_zero(recipe) else None  # ZeRO partitions within the node
    config = deepspeed_config(recipe, world, None if mpu is None else mpu.get_data_parallel_world_size())
    with _scoped_mpu():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=config, mpu=mpu)
    total = steps_per_epoch * recipe.train.epochs
    attachment = attach(engine, recipe.method, meter=meter, check_every=recipe.train.check_consistency_every,
                        total_steps=total, order=order, nonfinite=getattr(recipe.train, "nonfinite", "skip"),
                        steps_per_epoch=steps_per_epoch)
    return engine, attachment, schedule


# ---- the data against the model (before the engine is built; host data, once) --------------------------

def output_classes(model: torch.nn.Module, bundle) -> int:
    """The classes ``model`` scores (dim 1 of its output, what ``cross_entropy`` reads), from a forward pass
    of two training examples on torch's meta device (shapes only; the model and the RNG are untouched); the
    data set's ``num_classes`` when the model cannot run there or the data set cannot be indexed."""
    import itertools

    try:
        with torch.random.fork_rng(devices=[]):
            x = bundle.train[0][0]
        x = torch.as_tensor(x).unsqueeze(0).expand(2, *x.shape).to("meta")
        state = {k: torch.empty_like(v, device="meta")
                 for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = torch.func.functional_call(model, state, (x,))
        finally:
            model.train(was)
        return int(out.shape[1])
    except Exception:  # noqa: BLE001 -- no meta kernel, an ffcv split, ...: the data set's own count
        return int(bundle.num_classes)


def check_data(bundle, model: torch.nn.Module):
    """``(error, warning)`` about the data a run loaded, each a sentence or None, from the examples held in
    memory: a label outside the model's classes in either split or a non-finite input in the validation set
    (errors: the run would fail at the first such batch, or report a nan validation loss every epoch);
    non-finite inputs in the training set (a warning: the steps that draw them are skipped,
    ``train.nonfinite``)."""
    from ..data.base import label_problem, nonfinite_examples

    classes = output_classes(model, bundle)
    for split, ds in (("training", bundle.train), ("validation", bundle.val)):
        problem = label_problem(ds, classes, split)
        if problem:
            return problem, None
    n, first = nonfinite_examples(bundle.val)
    if n:
        return (f"{n} of {len(bundle.val)} validation examples hold non-finite input values (first: validation "
                f"example {first}); every validation loss would be nan"), None
    n, first = nonfinite_examples(bundle.train)
    if n:
        return None, (f"{n} of {len(bundle.train)} training examples hold non-finite input values (first: "
                      f"training example {first}); the optimizer steps that draw them get non-finite gradients "
                      f"(train.nonfinite: skip skips them)")
    return None, None


def out_of_memory(e: BaseException) -> Optional[str]:
    """The allocator's own words when ``e`` is an allocation failure (host or device), else None."""
    import re

    text = " ".join(str(e).split())
    m = re.search(r"(can't allocate memory|not enough memory|out of memory)[^.]*", text, re.IGNORECASE)
    if m and isinstance(e, RuntimeError):
        return m.group(0)[:160]
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return (m.group(0)[:160] if m else None) or type(e).__name__
    return None
