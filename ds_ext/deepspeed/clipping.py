"""What DeepSpeed's ``gradient_clipping`` means under a ds_ext reducer: ``method.clip``.

DeepSpeed clips the gradient its optimizer applies, by the L2 norm of the whole model's gradient, at threshold
``deepspeed.gradient_clipping`` (0: off). Under a ds_ext reducer that gradient is what the reducer's ``finish()``
wrote into ``p.grad``: the reduced (for compressors: decompressed) gradient. Two meanings are possible, and they
differ wherever compression changes the norm (a top-k or ExDyna gradient is mostly zeros, so its norm is smaller
than the dense mean's and the same threshold clips it less: a larger effective step than S-SGD's):

* ``clip: after`` (default, DeepSpeed's own meaning): the reduced gradient, after the exchange, by its global norm
  (identical on every rank, so no extra communication beyond DeepSpeed's). What the QSR reference does for S-SGD
  (``all_reduce`` then ``clip_grad_norm_``).
* ``clip: before``: each rank clips its own accumulated local gradient, by its local norm (no communication), before
  the reducer sees it (before error feedback is added: the residual is not clipped). What the reference code of
  PowerSGD (epfml/powersgd ``paper-code``, language-model task: ``clip_grad_norm_`` in
  ``batch_loss_and_gradient``, before the reducer), ExDyna and its top-k baseline (kljp/exdyna ``cnn-lstm``, the
  same task code) and D-GraB v1's LSTM script (before the sorter) do. DeepSpeed's own clipping is switched off
  while attached (the threshold moves here) and put back by ``detach()``.

``before`` needs the whole local gradient before clipping, so the reducer's per-parameter work, which otherwise
starts from the gradient-ready hooks during backward, starts at ``engine.step()`` instead (in the order the
gradients became ready): no communication overlaps backward. It needs a reducer that replaces the engine's
allreduce (not ``deepspeed``: the engine reduces during backward) and sends this accumulated gradient (not
``cdgrab``, which exchanges every microbatch gradient during backward), ZeRO stage 0 and fp32 parameters without a
gradient scaler (DeepSpeed's fp16 / bf16 / ZeRO optimizers clip inside their own step); anything else is refused
by ``clip_problem``. With no threshold (``gradient_clipping`` 0) the two are the same: nothing is clipped and
nothing is deferred.
"""
from __future__ import annotations

from typing import List, Optional

import torch

CLIP_MODES = ("after", "before")


def clip_problem(mode: str, reducer_name: str, replaces_allreduce: bool, zero_stage: int, precision: str,
                 threshold: float, autocast: bool = False, microbatches: bool = False) -> Optional[str]:
    """Why ``method.clip: <mode>`` cannot run with these settings (one sentence), or None."""
    if mode not in CLIP_MODES:
        return f"method.clip must be one of {', '.join(CLIP_MODES)}, not {mode!r}"
    if mode == "after" or threshold <= 0:
        return None
    if not replaces_allreduce:
        return (f"method.clip: before clips each rank's local gradient before the reducer, but reducer "
                f"{reducer_name!r} lets DeepSpeed reduce during backward; use reducer allreduce or clip: after")
    if microbatches:
        return (f"method.clip: before clips each rank's accumulated gradient, but reducer {reducer_name!r} applies the "
                f"mean of the microbatch gradients it gathered during backward, so nothing it sends would be "
                f"clipped; use clip: after")
    if zero_stage != 0 or precision != "fp32" or autocast:
        return (f"method.clip: before needs ZeRO stage 0 and fp32 without a gradient scaler (got ZeRO stage "
                f"{zero_stage}, {precision}{', torch_autocast' if autocast else ''}): DeepSpeed's fp16/bf16/ZeRO "
                f"optimizers clip inside their own step; use clip: after")
    return None


class LocalClip:
    """``clip: before`` on one engine: holds the threshold (taken from DeepSpeed's config, whose own clipping it
    switches off until ``restore``) and the parameters whose gradients are ready, in order."""

    def __init__(self, engine, max_norm: float):
        self.engine, self.max_norm = engine, float(max_norm)
        self.pending: List[torch.nn.Parameter] = []
        engine._config.gradient_clipping = 0.0  # DeepSpeed's _take_model_step reads engine.gradient_clipping()

    @classmethod
    def for_engine(cls, engine, mode: str, reducer, name: str) -> Optional["LocalClip"]:
        """The ``LocalClip`` for ``clip: before`` with a threshold, None otherwise; ``ValueError`` when the
        settings cannot run (``clip_problem``)."""
        if mode == "after":  # DeepSpeed's own meaning: nothing to hold or check (clip_problem)
            return None
        threshold = float(engine.gradient_clipping() or 0.0)
        precision = "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32"
        autocast = bool(getattr(engine, "torch_autocast_z0_gradscaler", None))
        why = clip_problem(mode, name, reducer.replaces_engine_allreduce, engine.zero_optimization_stage(),
                           precision, threshold, autocast, bool(getattr(reducer, "observes_microbatches", False)))
        if why:
            raise ValueError(why)
        return cls(engine, threshold) if mode == "before" and threshold > 0 else None

    def ready(self, p: torch.nn.Parameter) -> None:
        """A gradient-ready hook at the accumulation boundary: remember ``p`` (the reducer sees it at ``flush``)."""
        self.pending.append(p)

    def flush(self, reducer) -> None:
        """Clip this rank's accumulated gradient to ``max_norm`` by its local L2 norm (no host read: the
        coefficient stays a tensor, as ``torch.nn.utils.clip_grad_norm_``), then hand every pending parameter
        to the reducer in the order they became ready."""
        if self.pending:  # clip_grad_norm_ takes the parameters and reads their .grad
            torch.nn.utils.clip_grad_norm_(self.pending, self.max_norm)
        for p in self.pending:
            reducer.grad_ready(p)
        self.pending.clear()

    def restore(self) -> None:
        """Give DeepSpeed its threshold back (``Attachment.detach``)."""
        self.engine._config.gradient_clipping = self.max_norm
        self.pending.clear()


def settings_problem(mode: str, reducer_name: str, deepspeed: dict) -> Optional[str]:
    """``clip_problem`` read from a recipe: the registered reducer's class and the DeepSpeed section (the recipe
    check runs it before launch, so a refused setting is one line, not a failure inside ``attach``)."""
    from ..registry import REDUCERS, precision_of, zero_stage_of

    if reducer_name not in REDUCERS:
        return None  # the recipe reports the unknown name itself
    cls = REDUCERS.get(reducer_name).factory
    autocast = bool((deepspeed.get("torch_autocast") or {}).get("enabled", False))
    return clip_problem(mode, reducer_name, bool(getattr(cls, "replaces_engine_allreduce", True)),
                        zero_stage_of(deepspeed), precision_of(deepspeed),
                        float(deepspeed.get("gradient_clipping", 0) or 0), autocast,
                        bool(getattr(cls, "observes_microbatches", False)))
