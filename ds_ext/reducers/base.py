"""The reducer contract.

* The engine's own gradient allreduce is switched off (``engine.enable_backward_allreduce = False``,
  as DeepSpeed's 1-bit Adam does) unless ``replaces_engine_allreduce`` is False.
* ``grad_ready(p)`` is called from ``p.register_post_accumulate_grad_hook`` during backward, and
  only on the micro-batch that closes a gradient-accumulation window, so communication can start
  while backward is still running.
* ``finish()`` is called before the optimizer step at that boundary: it waits for outstanding
  communication and writes the averaged gradients into ``p.grad``.
* Every collective goes through ``self.comm`` (``ds_ext.comm.Communicator``: metering, device,
  DeepSpeed's comms logger); a reducer never calls ``torch.distributed``.
* ``state_dict()`` / ``load_state_dict()`` hold all state needed to resume exactly.
* ``stats()`` returns scalar diagnostics of the last step (e.g. achieved density); the trainer logs
  them as ``reducer/<name>``.
* ``describe(total_steps)`` is the one line ``attach`` logs on rank 0 (``ds_ext/deepspeed/announce.py``): what
  the reducer is, what it compresses and its bytes per step against an uncompressed fp32 allreduce;
  ``warmup()`` names a stretch of plain allreduce before compression starts (PowerSGD's
  ``start_powerSGD_iter``).
* The non-finite guard (``ds_ext.deepspeed.step_hooks.NonFiniteGuard``) reads what the reducer already makes
  (``nonfinite_view``): ``reduced``, a non-finite value on any rank reaches the buffers its collectives return,
  identical on every rank, so ``nonfinite_flag()`` (one fused check of the buffers it ``_watch``ed) gives
  every rank the same verdict with no collective; ``exchange``, each rank's own check rides on the reducer's
  control exchange (``nonfinite_ranks()``); ``local``, the guard checks each rank's gradients itself (one
  fused pass) and shares the flags on the step's control exchange. After a skipped step
  ``reset_nonfinite()`` drops the state that may have absorbed the value (error feedback, warm-start
  factors), alike on every rank.
* ``keeps_scaled_state``: the reducer carries state computed from the gradient values from one step to
  the next (an error-feedback residual). Every such reducer (``error_feedback_reducers()``) follows one
  fp16 policy, ``fp16_loss_scaling_problem``: DeepSpeed's fp16 *dynamic* loss scaling is refused, a static
  ``fp16.loss_scale`` is accepted.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from pydantic import AliasChoices, Field

from ..comm import Communicator, for_params
from ..meter import human_bytes
from ..registry import REDUCERS, NoOptions, Options, precision_of, zero_stage_of


def error_feedback_field(description: str, default: bool = True):
    """The ``error_feedback`` option of every error-feedback reducer, with PyTorch PowerSGD's spelling
    ``use_error_feedback`` accepted as an alias on all of them (one spelling per concept across methods,
    ``registry.Options``)."""
    return Field(default, validation_alias=AliasChoices("error_feedback", "use_error_feedback"),
                 description=description)


class GradientOptions(Options):
    """Options every gradient-compressing reducer shares."""

    hierarchical: bool = Field(False, description="exact mean inside each node, the method only between nodes "
                                                  "(node layout from the deepspeed launcher; ds_ext/hierarchy.py)")


def zero_stage_problem(reducer: str, ds) -> Optional[Tuple[str, str]]:
    """Why a gradient reducer (one that replaces DeepSpeed's reduction) cannot run under this DeepSpeed
    config's ZeRO settings, as ``(recipe key, message)``, or None. The one statement of the rule: the recipe check and ``attach`` both
    reach it through ``Reducer.check``. Stages 1 and 2 work: the method's exchange replaces ZeRO's
    gradient reduce-scatter and ZeRO keeps its optimizer-state partitions (``ds_ext.deepspeed.zero.ZeroBridge``)."""
    zero = ds.get("zero_optimization") or {}
    stage = zero_stage_of(ds)
    if stage == 0:
        return None
    if stage >= 3:
        return ("deepspeed.zero_optimization.stage",
                f"reducer {reducer!r} works with ZeRO stage 0, 1 or 2 (got {stage}): ZeRO-3 partitions the "
                "parameters themselves, so no rank holds a whole gradient to compress. Use stage 1 or 2 (the "
                "optimizer state is partitioned either way), or reducer 'deepspeed' to keep ZeRO-3")
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "")
    if stage == 1 and precision_of(ds) == "bf16" and accum.lower() in ("fp32", "float32", "float"):
        return ("deepspeed.data_types.grad_accum_dtype",
                f"reducer {reducer!r}: with bf16, ZeRO stage 1 and data_types.grad_accum_dtype {accum!r} DeepSpeed runs "
                "its BF16_Optimizer, not the ZeRO optimizer the reducer plugs into; remove grad_accum_dtype (the "
                "methods reduce in the gradients' dtype, their own state is fp32) or use stage 2")
    offload = zero.get("offload_optimizer") or {}
    device = offload.get("device", "none") if isinstance(offload, dict) else offload
    if device not in (None, "none", False):
        return ("deepspeed.zero_optimization.offload_optimizer",
                f"reducer {reducer!r} with ZeRO stage {stage} keeps the optimizer partition on the accelerator; "
                f"zero_optimization.offload_optimizer (device {device!r}) is not supported with a replacing "
                "reducer: remove it, or use reducer 'deepspeed'")
    return None


def fp16_loss_scaling_problem(reducer: str, ds) -> Optional[Tuple[str, str]]:
    """Why a reducer that keeps state across steps (``Reducer.keeps_scaled_state``: an error-feedback
    residual) cannot run under this DeepSpeed config's fp16 settings, as ``(recipe key, message)``, or None.
    The one statement of the fp16 policy of every error-feedback method.

    Refused: fp16 with *dynamic* loss scaling (``fp16.enabled`` and ``loss_scale`` absent or 0). The
    reducer sees the gradients still multiplied by the loss scale S_t (DeepSpeed unscales in the optimizer
    step), so the residual e_t is kept in the scale of the step that made it; when the scaler changes the
    scale (halved on an overflow, doubled after ``loss_scale_window`` clean steps) the next step adds
    e_t (scale S_t) to a gradient in scale S_{t+1} and DeepSpeed divides the sum by S_{t+1}: the carried
    error is silently multiplied by S_t / S_{t+1} (x2 or x1/2). That breaks the memory update every one
    of these methods is built on, e_{t+1} = (g_t + e_t) - C(g_t + e_t) with g and e in the same units
    (mem-SGD, Stich, Cordonnier & Jaggi 2018, Algorithm 1; EF-SignSGD, Karimireddy et al. 2019,
    Algorithm 1; PowerSGD, Vogels et al. 2019, Algorithm 1), and with it the conservation
    ``sum applied + mean residual == sum of mean gradients``. Supporting it would mean unscaling before
    error feedback and dropping an overflow step's contribution; DeepSpeed refuses fp16 on its CPU
    accelerator, so that route could not be tested end to end here, hence the uniform refusal.

    Accepted: a static ``fp16.loss_scale`` S > 0. Every gradient the reducer sees is S g, every residual
    is in the same scale, and each method's output is positively homogeneous in its input (top-k
    selection, sign and mean |p|, P Q^T with a scale-free orthogonalisation), so the applied gradient is
    S times the unscaled method's and DeepSpeed's division by S undoes it (up to rounding; that is what a
    static scale is for). One absolute quantity remains: ExDyna's threshold, whose default first value 1/(2 sqrt k)
    is in gradient units and then adapts (x1.005 per step off target); set ``initial_threshold`` to
    S/(2 sqrt k) to start where an fp32 run starts.

    The rule does not look at a method's ``error_feedback`` option (as the flat reducers' refusal never
    did): one rule for the family, and ExDyna's threshold is in gradient units even without a residual."""
    fp16 = ds.get("fp16") if isinstance(ds, Mapping) else None
    if not isinstance(fp16, Mapping) or not fp16.get("enabled", False) or fp16.get("loss_scale"):
        return None
    return ("method.reducer", fp16_dynamic_refusal(reducer))


def error_feedback_reducers() -> List[str]:
    """The registered reducers that declare ``keeps_scaled_state`` (read from the registry, never typed out)."""
    return [n for n in REDUCERS.names() if getattr(REDUCERS.get(n).factory, "keeps_scaled_state", False)]


def fp16_dynamic_refusal(reducer: str) -> str:
    """The one message of the fp16 policy (``fp16_loss_scaling_problem``), the same for every error-feedback
    reducer; it names them from the registry."""
    return (f"reducer {reducer!r} is an error-feedback method: the residual it carries from step to step stays in "
            "the loss scale of the step that made it, so under fp16 dynamic loss scaling every change of the scale "
            f"corrupts it (refused alike for {', '.join(error_feedback_reducers())}); use bf16 or fp32, or a static "
            "deepspeed.fp16.loss_scale > 0")


def any_nonfinite(tensors: Sequence[torch.Tensor], device=None) -> torch.Tensor:
    """Whether any element of ``tensors`` is NaN or +-inf: a 0-dim bool tensor, nothing read on the host.
    Exact: one ``aminmax`` pass per tensor (NaN propagates into both, +inf is the max, -inf the min; a finite
    tensor is never flagged), then one ``isfinite`` of the 2 x T extremes. ``aminmax`` is a vectorised
    reduction, about 10x faster on the CPU than the ``inf``-norm (``benchmarks/guard.py``)."""
    ts = [t.reshape(-1) for t in tensors if t is not None and t.numel()]
    if not ts:
        return torch.zeros((), dtype=torch.bool, device=device)
    ext = [torch.stack(torch.aminmax(t)).float() for t in ts]
    out = ~torch.isfinite(torch.cat(ext) if len(ext) > 1 else ext[0]).all()
    return out if device is None else out.to(device)


class Reducer:
    Options = NoOptions
    replaces_engine_allreduce = True
    #: carries state computed from the gradient values across steps (an error-feedback residual): the
    #: fp16 policy of ``fp16_loss_scaling_problem`` applies (checked by ``Reducer.check``)
    keeps_scaled_state = False

    #: uses ``ds_ext.ops`` kernels (``attach`` prepares them at start-up, not inside step 1)
    uses_kernels = False
    #: exchanges gradients on the steps the synchronizer reduces them (``none`` does not: nothing is
    #: exchanged per step, so no per-step control vote can ride on it; see ``ds_ext.deepspeed.step_hooks.StopVote``)
    communicates_gradients = True
    #: consumes every microbatch gradient itself (``microbatch``; with the matching order, ``bind_order``)
    observes_microbatches = False
    #: where the non-finite guard sees a NaN / inf of any rank (module docstring): ``reduced``, ``exchange``
    #: or ``local``
    nonfinite_view = "local"

    def __init__(self, named_params: List[Tuple[str, torch.nn.Parameter]], options: Options,
                 comm: Optional[Communicator] = None, engine=None, group=None, meter=None):
        """``comm``: the communicator ``attach`` hands in; without one (benchmarks, tests) a
        communicator over ``group`` on the parameters' device, metered by ``meter``."""
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.options = options
        self.comm = comm if comm is not None else for_params(self.params, group=group, meter=meter)
        self.engine = engine
        self.world_size = self.comm.world_size
        self.rank = self.comm.rank
        self._watched: Optional[List[torch.Tensor]] = None  # reduced buffers of this step (guard on)

    @property
    def meter(self):
        return self.comm.meter

    def grad_ready(self, p: torch.nn.Parameter) -> None:
        pass

    def bind_order(self, order) -> None:
        """Reducers that observe microbatches take their order here (``observes_microbatches``)."""
        raise ValueError(f"reducer {type(self).__name__} does not observe microbatch gradients")

    def microbatch(self, flat: torch.Tensor) -> None:
        raise ValueError(f"reducer {type(self).__name__} does not observe microbatch gradients")

    def finish(self) -> None:
        pass

    # -- the non-finite guard's view (module docstring) ----------------------------------------------
    def watch_nonfinite(self) -> None:
        """The guard is on: keep this step's reduced buffers (``_watch``) for ``nonfinite_flag``."""
        if self.nonfinite_view == "reduced":
            self._watched = []

    def _watch(self, *bufs: torch.Tensor) -> None:
        """Buffers a collective returns, identical on every rank after ``finish`` (kept only when watched)."""
        if self._watched is not None:
            self._watched.extend(bufs)

    def nonfinite_flag(self) -> Optional[torch.Tensor]:
        """After ``finish``: whether this step's reduced buffers hold a NaN or inf (0-dim bool on
        ``comm.device``, not read; the same on every rank), or None where ``nonfinite_view`` is not
        ``reduced``. Forgets the buffers."""
        if self.nonfinite_view != "reduced":
            return None
        bufs = self._watched or []
        if self._watched is not None:
            self._watched = []
        return any_nonfinite(bufs, self.comm.device)

    def nonfinite_ranks(self) -> Optional[List[int]]:
        """After ``finish`` (``nonfinite_view == "exchange"``): the ranks whose own check, carried on the
        reducer's control exchange, found a NaN or inf (host ints, already read); None otherwise."""
        return None

    def reset_nonfinite(self) -> None:
        """The step was skipped for a non-finite value: drop every state that may have absorbed it (error
        feedback, warm-start factors), alike on every rank. Stateless reducers: nothing."""

    def state_dict(self) -> dict:
        return {}

    def stats(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- what attach says (ds_ext/deepspeed/announce.py) ---------------------------------------------
    @property
    def registered_name(self) -> str:
        return REDUCERS.name_of(self) or type(self).__name__

    def bytes_per_step(self) -> float:
        """Payload per rank per optimizer step in the steady state, from ``collectives`` (fp32 gradients)."""
        shapes = [tuple(p.shape) for p in self.params]
        return float(sum(c.nbytes * c.calls for c in type(self).collectives(shapes, self.world_size, self.options)))

    def dense_bytes(self) -> int:
        """One uncompressed fp32 gradient: what a plain allreduce sends per rank per step."""
        return 4 * sum(p.numel() for p in self.params)

    def traffic(self) -> str:
        """``~13.0 KiB/step vs 97.0 MiB uncompressed``: ``bytes_per_step`` against ``dense_bytes``."""
        return f"~{human_bytes(self.bytes_per_step())}/step vs {human_bytes(self.dense_bytes())} uncompressed"

    def warmup(self) -> Optional[Tuple[int, str]]:
        """``(steps, option)``: the first ``steps`` optimizer steps send a plain allreduce before the method
        compresses, set by ``option``; None: the method runs from the first step."""
        return None

    def describe(self, total_steps: Optional[int] = None) -> str:
        """One line for the attach announcement (``total_steps``: the run's, when known). Default: the registered
        name, the first line of the class docstring, the tensors and ``traffic()``."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        what = doc[0].rstrip(".") if doc else type(self).__name__
        return f"{self.registered_name}: {what}; {len(self.params)} tensors, {self.traffic()}"

    @classmethod
    def collectives(cls, shapes, world: int, options, **model) -> list:
        """The collectives one rank issues per optimizer step for parameters of these shapes
        (``ds_ext.comm.Collective``; fp32 gradients, steady state): what the cost model adds up and what
        the meter counts (tests/e2e/test_cluster.py checks the two agree). ``model``: assumptions a
        data-dependent method needs (``imbalance`` for exdyna, ``lr`` for a QSR period)."""
        return []

    @classmethod
    def check(cls, view) -> list:
        """Every problem of this reducer in this setting (``ds_ext.registry.MethodView``): a list of
        ``(recipe key, message)``. The one place each rule lives: the recipe check (before launch) and
        ``attach()`` both call it. World-size rules apply when ``view.world`` is known."""
        name = view.names["reducer"]
        problems = [zero_stage_problem(name, view.deepspeed)]
        if cls.keeps_scaled_state:
            problems.append(fp16_loss_scaling_problem(name, view.deepspeed))
        return [p for p in problems if p]
