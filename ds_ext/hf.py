"""Hugging Face ``transformers.Trainer`` and Accelerate: ds_ext's methods on the DeepSpeed engine they build.

``attach_to_trainer(trainer)`` (a Trainer) and ``attach_accelerator(accelerator)`` (an own Accelerate loop) attach
the ``ds_ext`` block of the DeepSpeed config; ``hf_problem`` refuses what cannot work there (a data order other than
``rr``, reducer ``cdgrab``); ``cpu_deepspeed_state()`` makes it run without a GPU. How to use it, what is checkpointed
and what is refused, with the reasons: ``docs/guide/huggingface.md``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, Optional

from transformers import TrainerCallback

from .deepspeed.announce import ensure_console, wandb_lines
from .deepspeed.attach import attach, method_spec
from .spec import block_parts

log = logging.getLogger(__name__)

__all__ = ["DsExtCallback", "attach_to_trainer", "attach_accelerator", "cpu_deepspeed_state", "hf_problem"]


def hf_problem(method) -> Optional[str]:
    """Why a method cannot run under the Trainer / Accelerate (None when it can); ``method`` is a validated
    ``spec.MethodSection``."""
    order, _ = block_parts(method.order, "rr")
    reducer, _ = block_parts(method.reducer, "allreduce")
    if order != "rr":
        return (f"ds_ext.order {order!r} cannot run under the Hugging Face Trainer or Accelerate: it reorders the "
                f"examples, so it must own the sampler, and the Trainer builds its own data loader (and it sees every "
                f"micro-batch gradient through engine.step, which Accelerate calls only at accumulation "
                f"boundaries); use order 'rr' here, or the ds_ext trainer (python -m ds_ext.train)")
    if reducer == "cdgrab":
        return ("ds_ext.reducer 'cdgrab' needs the 'cdgrab' order, which cannot run under the Hugging Face Trainer "
                "or Accelerate; use another reducer, or the ds_ext trainer (python -m ds_ext.train)")
    return None


def _is_engine(obj) -> bool:
    return callable(getattr(obj, "is_gradient_accumulation_boundary", None)) and hasattr(obj, "optimizer")


def _attach_checked(engine, method, **kwargs):
    spec = method_spec(engine, method)
    problem = hf_problem(spec)
    if problem:
        raise ValueError(problem)
    return attach(engine, spec, **kwargs)


class DsExtCallback(TrainerCallback):
    """Attaches ds_ext to the DeepSpeed engine of the Trainer it is bound to (``attach_to_trainer``).
    ``method`` (optional): as ``ds_ext.attach``'s; None reads the config's ``ds_ext`` block.
    ``attach_kwargs`` go to ``ds_ext.attach`` (``meter``, ``check_every``, ``nonfinite``, ...).
    ``attachment`` is the ``Attachment`` once the Trainer has built its engine.

    When: right after the Trainer's ``accelerator.prepare`` builds the engine (``attach_to_trainer`` wraps
    that call on the Trainer's accelerator), which is before the Trainer loads a checkpoint to resume from,
    so the attachment's ``engine.load_checkpoint`` restores the methods' state too. ``on_train_begin``
    checks that this happened; if the engine came from elsewhere it attaches there, and a resumed run
    is then told (a warning) that its method state starts fresh."""

    def __init__(self, method=None, **attach_kwargs: Any):
        self.method, self.attach_kwargs = method, attach_kwargs
        self.trainer = None
        self.attachment = None

    def bind(self, trainer) -> "DsExtCallback":
        self.trainer = trainer
        return self

    def attach_engine(self, engine) -> None:
        """Attach to ``engine`` unless already attached to it (a new engine replaces the old attachment)."""
        if self.attachment is not None and self.attachment.engine is engine:
            return
        if self.attachment is not None:  # a new engine: the old one is gone
            self.attachment.detach(restore_engine=False)
            self.attachment = None
        kwargs = dict(self.attach_kwargs)
        state = getattr(self.trainer, "state", None)
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if max_steps > 0:
            kwargs.setdefault("total_steps", max_steps)
        self.attachment = _attach_checked(engine, self.method, **kwargs)  # rank 0 logs what each method does
        log.debug("ds_ext attached to the Trainer's DeepSpeed engine: reducer %s, sync %s",
                  type(self.attachment.reducer).__name__, type(self.attachment.sync).__name__)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ValueError("DsExtCallback is not bound to its Trainer: use ds_ext.hf.attach_to_trainer(trainer)")
        engine = getattr(self.trainer, "model_wrapped", None)
        if not _is_engine(engine):
            raise ValueError("ds_ext needs the Trainer to run DeepSpeed: pass TrainingArguments(deepspeed=ds_config) "
                             f"(the Trainer's model is a {type(engine).__name__}, not a DeepSpeed engine)")
        if self.attachment is None or self.attachment.engine is not engine:
            self.attach_engine(engine)
            if state.global_step > 0:
                log.warning("ds_ext attached after the Trainer resumed at step %d: the methods' state (error "
                            "feedback, factors) starts fresh; attach with ds_ext.hf.attach_to_trainer before "
                            "trainer.train() to resume it", state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        """Rank 0 logs the attachment's ``summary()`` and, when a wandb run is active, where it is."""
        att = self.attachment
        if att is None or att.comm.global_rank != 0:
            return
        ensure_console()
        for line in att.summary().splitlines():
            log.info("%s", line)
        wandb = sys.modules.get("wandb")
        for line in wandb_lines(getattr(wandb, "run", None)):
            log.info("%s", line)


def attach_to_trainer(trainer, method=None, **attach_kwargs: Any) -> DsExtCallback:
    """Before ``trainer.train()``: attach ds_ext to the DeepSpeed engine as soon as the Trainer's accelerator
    builds it (its ``prepare`` is wrapped on this Trainer's accelerator instance), and add the callback that
    checks it at ``on_train_begin``. Returns the callback (``callback.attachment`` once training began)."""
    cb = DsExtCallback(method, **attach_kwargs).bind(trainer)
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and not getattr(accelerator.prepare, "_ds_ext", False):
        orig = accelerator.prepare

        def prepare(*args, **kwargs):
            if cb.attachment is not None and getattr(accelerator, "deepspeed_engine_wrapped", None) is None:
                # the Trainer freed its engine (a second train(), auto_find_batch_size): let go of it without
                # giving its destroyed ZeRO optimizer its hooks back (they would land on the shared parameters)
                cb.attachment.detach(restore_engine=False)
                cb.attachment = None
            out = orig(*args, **kwargs)
            engine = getattr(getattr(accelerator, "deepspeed_engine_wrapped", None), "engine", None)
            if _is_engine(engine):
                cb.attach_engine(engine)
            return out

        prepare._ds_ext = True
        accelerator.prepare = prepare
    trainer.add_callback(cb)
    return cb


def attach_accelerator(accelerator, method=None, **attach_kwargs: Any):
    """``ds_ext.attach`` on the DeepSpeed engine of an ``accelerate.Accelerator`` after ``prepare``."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    engine = getattr(wrapped, "engine", None)
    if not _is_engine(engine):
        raise ValueError("ds_ext needs Accelerate to run DeepSpeed (a DeepSpeedPlugin, or accelerate launch with "
                         "a DeepSpeed config), and accelerator.prepare(model, optimizer, ...) called first")
    return _attach_checked(engine, method, **attach_kwargs)


def cpu_deepspeed_state() -> Dict[str, Any]:
    """Without a GPU: set Accelerate's process state up for DeepSpeed over gloo (the launcher's environment,
    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, must be set) and return the ``TrainingArguments`` keyword
    (``accelerator_config``) that makes the Trainer use that state. Accelerate otherwise treats a CPU-only
    process as not distributed when DeepSpeed is asked for. Call it before building ``TrainingArguments``.
    Without the launcher's environment (``python script.py``; on CPU, ``accelerate launch`` without
    ``--use_deepspeed``) it raises ``RuntimeError`` with one line naming the two launch commands that work."""
    from accelerate import PartialState

    missing = [k for k in ("LOCAL_RANK", "WORLD_SIZE") if k not in os.environ]
    if missing:  # plain `python script.py`, or `accelerate launch` without --use_deepspeed on CPU: one process, no group
        raise RuntimeError(f"ds_ext.hf.cpu_deepspeed_state: {'/'.join(missing)} unset: no multi-process "
                           "launcher started this process; launch with `deepspeed --num_gpus N script.py` or `accelerate launch "
                           "--use_deepspeed --num_processes N script.py`")
    before = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if before is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = before
    return {"accelerator_config": {"use_configured_state": True}}
