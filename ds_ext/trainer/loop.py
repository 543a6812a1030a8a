"""The trainer's training loop: ``train(recipe)`` starts the process group and runs one recipe on every rank.

The command line is ``ds_ext.trainer.cli``; the console lines of the library, ``history.jsonl`` and the
run directory's other records are ``ds_ext.trainer.records``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import faults
from ..comm import gather_objects
from . import setup
from ..meter import CommMeter, purpose_key
from ..data.base import nonfinite_inputs
from ..registry import DATASETS, MODELS, ORDERS
from .evaluation import _batch_loader, evaluate
from .exit_codes import ExitCode
from .records import RunRecords, StepWindow
from . import saying
from .rng import rng_state, seed_all, set_rng_state


class _Exit(Exception):
    """Leave the run on purpose with ``code``; rank 0 prints ``message`` (the same verdict on every rank)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def train(recipe) -> int:
    """Start the process group, run the training (``Trainer``) and make every way out explicit.

    A peer watchdog (``ds_ext.trainer.faults.Watchdog``) runs beside the training: when another rank dies
    (SIGKILL, crash, out of memory) or stops on an error, this rank prints one line naming that rank
    and the step and exits with ``ExitCode.PEER_LOST`` (4) within seconds, without a traceback;
    a failed collective on this thread leads to the same line (``faults.explain_failure``). Every
    other way out is one verdict shared by every rank, printed once by rank 0, with one exit code:
    a checkpoint that cannot be resumed from (``ExitCode.CHECKPOINT``, 5), a run or checkpoint
    directory held by another job (``ExitCode.BUSY``, 6), a failed save (``ExitCode.SAVE``,
    7; the previous checkpoint is intact), divergence (``ExitCode.DIVERGED``, 8:
    ``train.max_consecutive_skips`` skipped steps in a row), a signal with ``checkpoint.on_signal: save``
    (``ExitCode.PREEMPTED``, 75, after saving). Leaving normally or on purpose tells the other ranks
    the exit code.
    ``DS_EXT_FAULT`` (tests only) kills this rank at a chosen point; see ``ds_ext.trainer.faults``."""
    import torch.distributed as dist

    from ..comm import init_distributed
    from ..registry import REDUCERS, load_builtin

    init_distributed(recipe.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    saying.thread_default(rank)  # OMP_NUM_THREADS unset: cores / local ranks (ds_ext/deepspeed/threads.py)
    try:
        faults.load_fault_plan(rank)
    except faults.FaultSpecError as e:  # the same environment on every rank
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return ExitCode.RECIPE
    faults.progress(0, "start-up")
    # saving on a signal needs a per-step stop vote, which rides on the gradient exchange (ds_ext.deepspeed.step_hooks.StopVote)
    load_builtin()
    votes = world == 1 or REDUCERS.get(recipe.method.reducer.name).factory.communicates_gradients
    on_signal = recipe.checkpoint.on_signal if votes else "exit"
    wd = faults.Watchdog.start(rank, world, on_signal=on_signal)
    if wd is None:
        faults.install_signal_handlers(on_signal)
    code, reason = 1, "exception"
    locks: list = []
    try:
        code = Trainer(recipe, rank, world, locks).run()
        return code
    except _Exit as e:
        code = e.code
        if rank == 0:
            print(e.message, file=sys.stderr, flush=True)
        return code
    except ckpt.CheckpointError as e:  # a damaged or missing file while loading: may concern this rank only
        code, reason = ExitCode.CHECKPOINT, f"checkpoint error on rank {rank}"
        print(f"checkpoint error (rank {rank}):\n{recipe.source}: checkpoint.resume: {e}", file=sys.stderr)
        return code
    except BaseException as e:
        faults.explain_failure(e, wd, rank)  # a failed collective: prints who was lost and ends the process
        code, reason = 1, f"{type(e).__name__}: {e}"
        raise
    finally:
        reason = ExitCode.reason_of(code, reason)
        for lock in locks:
            lock.release()
        if wd is not None:
            wd.close(code, reason)
        else:
            faults.restore_signal_handlers()


class Trainer:
    """One training run of ``recipe`` on this rank: ``run()`` goes through the phases ``setup`` (batch plan,
    directory locks, the checkpoint to resume from, data, model, order, engine), ``resume``, ``open_records``,
    then ``run_epoch`` for each epoch (``on_step`` after each optimizer step: divergence, logging, progress,
    a stop on a signal, saves, ``train.stop_at_step``) with ``end_epoch`` (evaluation, the epoch's save), and
    ``finish`` (the final evaluation, the summary). ``save`` and ``evaluate`` are called from those. A verdict
    shared by every rank leaves through ``_Exit`` (rank 0 prints it in ``train``); rank 0's console lines and
    records go through ``self.records`` (``records.RunRecords``). ``locks`` receives the directory locks,
    which ``train`` releases."""

    def __init__(self, recipe, rank: int, world: int, locks: list):
        self.recipe, self.rank, self.world, self.locks = recipe, rank, world, locks
        self.is0 = rank == 0
        self.t, self.ce = recipe.train, recipe.checkpoint
        self.records = RunRecords(self.is0, recipe.log.dir)

    def run(self) -> int:
        self.setup()
        self.resume()
        self.open_records()
        for epoch in range(self.start_epoch, self.t.epochs):
            if self.run_epoch(epoch):  # train.stop_at_step
                return 0
            self.end_epoch(epoch)
        return self.finish()

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from .recipe import RecipeError

        try:
            self.micro, self.gas = self.recipe.batch_plan(self.world)
        except RecipeError as e:  # same verdict on every rank, so every rank exits
            raise _Exit(ExitCode.RECIPE, f"recipe error:\n{e}") from None
        self._lock_dirs()
        self._choose_checkpoint()
        self._build()
        self.meter = CommMeter()
        self.sent = saying.reported(self.meter, self.world)  # world size 1: nothing communicated
        self.engine, self.att, self.schedule = setup.initialize(self.recipe, self.model, self.steps_per_epoch, self.meter,
                                                          order=self.order)
        seed_all(self.t.seed + 1 + self.rank)  # per-rank stream for dropout / augmentation
        self.p0 = next(self.engine.module.parameters())
        self.names = self.recipe.method_names()

    def _lock_dirs(self) -> None:
        """One job per run and checkpoint directory, for the whole run (rank 0 holds the locks)."""
        job, busy = None, None
        if self.is0:
            job = ckpt.job_identity()
            try:
                self.locks.extend(ckpt.lock_dirs([self.recipe.log.dir, self.ce.dir], job))
            except ckpt.DirectoryBusy as e:
                busy = str(e)
        self.job, busy = gather_objects((job, busy))[0]  # rank 0's
        if busy:
            raise _Exit(ExitCode.BUSY, f"error: {self.recipe.source}: {busy}")

    def _choose_checkpoint(self) -> None:
        """The checkpoint to resume from (every rank verifies a share of it and all choose alike), and whether
        this run may continue it."""
        ce = self.ce
        self.meta = ckpt.run_meta(self.recipe, self.world)
        notes: List[str] = []
        try:
            self.resume_path = ckpt.choose(ce.resume, ce.dir, ce.integrity, warn=notes.append)
            if self.resume_path is not None:
                ckpt.check_meta(self.resume_path, self.meta)
        except ckpt.CheckpointError as e:
            raise _Exit(ExitCode.CHECKPOINT,
                        f"checkpoint error:\n{self.recipe.source}: checkpoint.resume: {e}") from None
        if self.is0:
            for n in notes:
                self.records.say(f"[ds_ext] warning: checkpoint.resume: {n}")
            earlier = ckpt.complete_checkpoints(ce.dir) if self.resume_path is None else []
            if earlier:
                self.records.say(f"[ds_ext] checkpoint.resume={json.dumps(ce.resume)}: {ce.dir} holds {len(earlier)} "
                                 f"checkpoint(s) of an earlier run (newest {earlier[0].name}); this run starts afresh "
                                 f"and its saves replace checkpoints of the same step")

    def _build(self) -> None:
        """The data, the model, the order and the steps per epoch."""
        recipe, t, micro, gas, world = self.recipe, self.t, self.micro, self.gas, self.world
        seed_all(t.seed)  # identical model initialisation on every rank
        try:
            self.bundle = DATASETS.build(recipe.data.name, recipe.data.options, root=recipe.data.root)
        except (FileNotFoundError, ImportError, ValueError) as e:  # same files on every rank: every rank exits
            raise _Exit(ExitCode.DATA, f"data error: {recipe.source}: data ({recipe.data.name}): {e}") from None
        self.model = self._build_model()
        error, warning = setup.check_data(self.bundle, self.model)  # same data on every rank: every rank exits
        if error:
            raise _Exit(ExitCode.DATA, f"data error: {recipe.source}: data ({recipe.data.name}): {error}")
        if warning:
            self.records.say(f"[ds_ext] warning: data ({recipe.data.name}): {warning}")
        order = self.order = ORDERS.build(recipe.method.order.name, recipe.method.order.options, len(self.bundle.train),
                                          self.rank, world, t.seed)
        steps_per_epoch = order.shard_size // micro // gas
        if t.steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, t.steps_per_epoch)
        if steps_per_epoch >= 1:  # gradient-driven orders may need fewer (D-GraB: an even microbatch count)
            try:
                steps_per_epoch, note = order.plan(micro, gas, steps_per_epoch)
            except ValueError as e:  # same verdict on every rank
                raise _Exit(ExitCode.RECIPE, f"recipe error:\n{recipe.source}: method.order: {e}") from None
            if note:
                self.records.say(f"[ds_ext] {note}")
        self.variable_units = bool(order.variable_units)  # dgrab remainder: visit
        if self.variable_units and getattr(self.bundle, "loader_factory", None) is not None:
            raise _Exit(ExitCode.RECIPE,
                        f"recipe error:\n{recipe.source}: method.order: remainder: visit makes microbatches of "
                        f"different sizes, which data set {recipe.data.name!r}'s own loader cannot serve; use "
                        f"remainder: drop")
        if steps_per_epoch < 1:
            raise _Exit(ExitCode.RECIPE,
                        f"recipe error:\n{recipe.source}: train.global_batch_size: {t.global_batch_size} exceeds "
                        f"the {order.shard_size * world} training examples usable on {world} ranks")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * t.epochs

    def _build_model(self):
        """The model, sized from the data where it needs to be (vocab, fields); an allocation failure on any
        rank is one recipe error on every rank, naming the model's options and its size."""
        from .recipe import model_line, parameter_count

        recipe, model, err = self.recipe, None, None
        try:
            model = MODELS.build(recipe.model.name, recipe.model.options, data=self.bundle)
        except (MemoryError, RuntimeError) as e:
            if not setup.out_of_memory(e):
                raise
            err = (f"{model_line(recipe, parameter_count(recipe))}: cannot be allocated on rank {self.rank} "
                   f"({setup.out_of_memory(e)}); make the model smaller")
        err = next((e for e in gather_objects(err) if e), None)
        if err:
            raise _Exit(ExitCode.RECIPE, f"recipe error:\n{recipe.source}: model: {err}")
        return model

    # ---- resume -----------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the chosen checkpoint (none: start at epoch 0): the engine, the attachment, the order, the RNG
        streams, the position in the epoch and the epoch's running loss; one verdict for every rank."""
        self.start_epoch, self.start_step = 0, 0
        self.resumed_epoch_loss = None  # (sum of this rank's microbatch losses so far in the epoch, their count)
        path, rank = self.resume_path, self.rank
        if path is None:
            return
        faults.progress(0, f"loading checkpoint {path.name}")
        err = None
        try:
            state = ckpt.load(self.engine, path, rank, self.world, step=ckpt.read_meta(path).get("step"))
            self.att.load_state_dict(state["attachment"])
            self.order.load_state_dict(state["order"])
            set_rng_state(state["rng"])
            self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
            self.resumed_epoch_loss = state.get("epoch_loss")  # absent in checkpoints of older versions
        except ckpt.CheckpointError as e:
            err = str(e)
        except Exception as e:  # a rank file whose content does not fit this run's state
            if faults.looks_distributed(e):
                raise
            err = (f"{ckpt.rank_file(path, rank)}: does not fit this run ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:160]})")
        err = ckpt.shared_verdict(err)  # every rank's verdict before anyone says "resumed"
        if err:
            raise _Exit(ExitCode.CHECKPOINT, f"checkpoint error:\n{self.recipe.source}: checkpoint.resume: {err}")
        self.records.say(f"[ds_ext] resumed from {path} at step {self.engine.global_steps} "
                         f"(epoch {self.start_epoch}, step {self.start_step} of {self.steps_per_epoch})")

    def open_records(self) -> None:
        """The start-up line, the run records, the stop vote and the counters of the loop."""
        recipe, t, names = self.recipe, self.t, self.names
        rem = self.order.remainder_note() if self.is0 else None  # dgrab / cdgrab: each shard's remainder
        line = (f"[ds_ext] {recipe.source}: world {self.world}, micro batch {self.micro} x accumulation {self.gas} "
                f"= global {t.global_batch_size}; {self.steps_per_epoch} steps/epoch x {t.epochs} epochs; "
                f"reducer={names['reducer']} sync={names['sync']} order={names['order']} "
                f"precision={recipe.precision()}; {f'{rem}; ' if rem else ''}run dir {recipe.log.dir}")
        self.records.open(recipe, line, self.total_steps, self.engine.global_steps, self.resume_path is not None)
        self.records.say(saying.prefixed(saying.start_lines(self.att, self.world, recipe.source)))
        self.att.vote_stop(lambda: faults.stop_requested() is not None)
        self.skip_streak = [0, 0]  # consecutive skipped steps on this rank, the last step that was not skipped
        self.data_skips: list = [0, None]  # skips of the streak whose examples had non-finite inputs, the first
        # what the bytes were for, naming the method that sent them (meter.PURPOSES; the rest is the reducer's)
        self.who = {"gradient exchange": f"reducer={names['reducer']}", "parameter averaging": f"sync={names['sync']}",
                    "order balancing": f"order={names['order']}"}
        self.window = StepWindow()  # step time and samples/s between logging steps (host timers)
        self.last_eval: dict = {}
        self.last_loss = float("nan")  # the last logged training loss (the progress bar shows it)
        self.t0 = time.perf_counter()
        self.samples_done = 0
        self.skips_seen = self.att.skipped_steps
        self.epoch_loss: list = [None, 0]

    # ---- the epochs -------------------------------------------------------------------------------
    def _loader(self, epoch: int, skip: int):
        """This rank's microbatches of ``epoch`` from optimizer step ``skip`` of the epoch on."""
        recipe, order, micro, gas = self.recipe, self.order, self.micro, self.gas
        loader_seed = (self.t.seed * 1_000_003 + epoch) * 4099 + self.rank
        if self.variable_units:  # microbatches of different sizes: one list of indices per microbatch
            units = order.epoch_batches(epoch)[: self.steps_per_epoch * gas]
            self.visit = [list(u) for u in units[skip * gas:]]
            return _batch_loader(self.bundle.train, units[skip * gas:], recipe.data.num_workers, loader_seed)
        idx = order.epoch_indices(epoch)[: self.steps_per_epoch * gas * micro]
        self.visit = idx[skip * gas * micro:]  # microbatch k of this loader: visit[k * micro:(k + 1) * micro]
        return self.bundle.loader("train", idx[skip * gas * micro:], micro, recipe.data.num_workers, seed=loader_seed)

    def step_examples(self) -> List[int]:
        """The training examples (indices into the data set) of this rank's last optimizer step."""
        first, end = self.step_micro
        if self.variable_units:
            return [i for u in self.visit[first:end] for i in u]
        return [int(i) for i in self.visit[first * self.micro:end * self.micro]]

    def run_epoch(self, epoch: int) -> bool:
        """Train ``epoch`` (from the resumed position in the first one); True when the run stops here
        (``train.stop_at_step``)."""
        engine, p0 = self.engine, self.p0
        skip = self.start_step if epoch == self.start_epoch else 0
        if hasattr(self.bundle.train, "set_epoch"):  # e.g. NCF draws fresh negatives every epoch
            self.bundle.train.set_epoch(epoch)
        loader = self._loader(epoch, skip)
        step_in_epoch, loss_acc, n_micro = skip, None, 0  # the loss stays on the device until a logging step
        # the epoch's loss sum on this rank (device) and microbatch count: all-reduced at the epoch's end
        self.epoch_loss = [None, 0]
        if epoch == self.start_epoch and skip and self.resumed_epoch_loss is not None:
            self.epoch_loss = [self.resumed_epoch_loss[0].to(p0.device), int(self.resumed_epoch_loss[1])]
        batches = iter(loader)
        k = 0  # microbatches taken from this loader
        while True:
            step = engine.global_steps + 1  # the optimizer step this micro-batch belongs to
            faults.progress(step, "data loading")
            faults.point("data", step)
            try:
                x, y = next(batches)
            except StopIteration:
                break
            faults.progress(step, "forward/backward")
            x = x.to(p0.device, dtype=p0.dtype if x.is_floating_point() else x.dtype, non_blocking=True)
            y = y.to(p0.device, non_blocking=True)
            out = engine(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=self.t.label_smoothing)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:  # the reducer's collectives were launched during backward; step() waits for them
                faults.progress(step, "gradient collectives and optimizer step")
                faults.point("collective", step)
            engine.step()
            loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
            n_micro, k = n_micro + 1, k + 1
            if not boundary:
                continue
            step_in_epoch += 1
            self.step_micro = (k - n_micro, k)
            if self.on_step(epoch, step_in_epoch, loss_acc, n_micro):
                return True
            loss_acc, n_micro = None, 0
            if step_in_epoch == self.steps_per_epoch:
                break
        return False

    def on_step(self, epoch: int, step_in_epoch: int, step_loss_t, micro_in_step: int) -> bool:
        """After optimizer step ``step_in_epoch`` of ``epoch`` (its summed microbatch loss on the device):
        divergence, the epoch's loss, logging, progress, a stop on a signal, saves; True when the run stops
        here (``train.stop_at_step``)."""
        t, att, gstep = self.t, self.att, self.engine.global_steps
        self.samples_done += t.global_batch_size
        self.window.step(t.global_batch_size)
        self._count_skips(gstep)
        el = self.epoch_loss
        el[0] = step_loss_t if el[0] is None else el[0] + step_loss_t
        el[1] += micro_in_step
        lr = self.schedule.get_last_lr()[0]
        if gstep % self.recipe.log.every_steps == 0 or step_in_epoch == self.steps_per_epoch:
            self.last_loss = float(step_loss_t) / micro_in_step  # the loss is read on logging steps only
            self._log_step(epoch, step_in_epoch, gstep, lr)
        self.records.bar.update(1, loss=f"{self.last_loss:.4f}", lr=f"{lr:.3g}",
                                sps=f"{self.samples_done / max(time.perf_counter() - self.t0, 1e-9):.0f}")
        if att.stop_agreed and gstep < self.total_steps:  # a signal (preemption): every rank at this same step
            self._preempted(epoch, step_in_epoch, gstep)
        stopping = t.stop_at_step is not None and gstep >= t.stop_at_step and gstep < self.total_steps
        if stopping or (self.ce.every_steps and gstep % self.ce.every_steps == 0 and gstep < self.total_steps):
            with self.window.paused():
                self.save(epoch, step_in_epoch)
        if stopping:
            self.records.close()
            self.records.say(f"[ds_ext] stopped at step {gstep} (train.stop_at_step); resume with "
                             f"--set checkpoint.resume=auto")
            self.records.finish()
            att.comm.barrier()
        return stopping

    def _count_skips(self, gstep: int) -> None:
        """The streak of skipped steps (non-finite gradients; host counters, no device read); a streak of
        ``train.max_consecutive_skips`` ends the run."""
        t, att, streak = self.t, self.att, self.skip_streak
        if att.skipped_steps > self.skips_seen:
            streak[0] += 1
            self._name_the_data(gstep)  # the skip path (it read the guard's flags already): host data only
        else:
            streak[:] = [0, gstep]
            self.data_skips = [0, None]
        self.skips_seen = att.skipped_steps
        if t.max_consecutive_skips and streak[0] >= t.max_consecutive_skips:
            n, first = self.data_skips
            advice = (f"{n} of them drew training examples with non-finite input values on rank {self.rank} "
                      f"(first: {first}): the data, not the learning rate; fix or drop those examples"
                      if n else "Lower optimizer.lr, add warm-up or deepspeed.gradient_clipping (or, where a rank "
                                "named non-finite input data above, fix the data)")
            raise _Exit(ExitCode.DIVERGED,
                        f"[ds_ext] error: training diverged: {streak[0]} optimizer steps in a row (up to step "
                        f"{gstep}) had non-finite gradients and were skipped (train.max_consecutive_skips="
                        f"{t.max_consecutive_skips}); last finite step {streak[1]}; no checkpoint was saved "
                        f"since then. {advice}, and resume from the last checkpoint (exit {ExitCode.DIVERGED})")

    def _name_the_data(self, gstep: int) -> None:
        """A skipped step: whether this rank's examples of the step hold non-finite input values, read again
        from the data set on the host (nothing on the device; skipped steps only). The first such step of a
        streak is named in one line by the rank that drew them."""
        try:
            bad = nonfinite_inputs(self.bundle.train, self.step_examples())
        except Exception:  # noqa: BLE001 -- a data set that cannot be indexed (ffcv): nothing to name
            return
        if not bad:
            return
        self.data_skips[0] += 1
        if self.data_skips[1] is None:
            self.data_skips[1] = f"training example {bad[0]} at step {gstep}"
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            print(f"[ds_ext] rank {self.rank}: step {gstep}: non-finite values in the input batch (data "
                  f"{self.recipe.data.name}: training example {bad[0]}{more}), not the learning rate; the "
                  f"optimizer step was skipped", file=sys.stderr, flush=True)

    def _log_step(self, epoch: int, step_in_epoch: int, gstep: int, lr: float) -> None:
        meter, att = self.sent, self.att
        step_time, samples_per_s = self.window.read()  # after the loss read: the window's device work is done
        rec = {"train/loss": self.last_loss, "train/lr": lr, "train/step_time_s": step_time,
               "train/samples_per_s": samples_per_s, "comm/bytes_step": meter.last_step_bytes,
               "comm/bytes_total": meter.total_bytes, "epoch": epoch + step_in_epoch / self.steps_per_epoch}
        if step_in_epoch == self.steps_per_epoch:  # the epoch's last step: every rank is here
            rec["train/epoch_loss_all_ranks"] = self._epoch_loss_all_ranks()
        rec.update({f"comm/bytes_total/{purpose_key(k)}": v for k, v in meter.by_purpose().items()})
        rec.update({f"reducer/{k}": v for k, v in att.reducer.stats().items()})
        rec["train/skipped_steps"] = att.skipped_steps  # non-finite gradients (train.nonfinite=skip)
        rec.update({f"sync/{k}": v for k, v in att.sync.stats().items()})
        rec.update({f"order/{k}": v for k, v in self.order.stats().items()})
        self.records.log(rec, gstep)

    def _epoch_loss_all_ranks(self) -> float:
        """The epoch's training loss over all ranks: each rank's mean microbatch loss (summed on the device
        during the epoch), averaged over the ranks by one all-reduce (control data, not metered), read once.
        Every rank runs the same number of microbatches, so this is the mean over all microbatches."""
        total, count = self.epoch_loss
        v = (total.detach().to(self.att.comm.device, torch.float64) / max(count, 1)).reshape(1)
        return float(self.att.comm.all_reduce_mean(v))

    def _preempted(self, epoch: int, step_in_epoch: int, gstep: int) -> None:
        """The ranks agreed to stop on a signal (``checkpoint.on_signal: save``): save and leave."""
        with self.window.paused():
            path = self.save(epoch, step_in_epoch)
        self.records.close()
        self.records.finish()
        got = faults.stop_requested()
        raise _Exit(ExitCode.PREEMPTED,
                    f"[ds_ext] stopped at step {gstep} on {got or 'a signal to another rank'} "
                    f"(checkpoint.on_signal=save); "
                    + (f"saved {path}; resume with --set checkpoint.resume=auto" if path else
                       "nothing saved (see above)") + f" (exit {ExitCode.PREEMPTED})")

    def end_epoch(self, epoch: int) -> None:
        """After ``epoch``: its evaluation (every ``train.eval_every_epochs`` and after the last) and its save
        (``checkpoint.every_epochs``; after the last whenever checkpoints are taken)."""
        t, ce, engine = self.t, self.ce, self.engine
        last_epoch = epoch + 1 == t.epochs
        if (t.eval_every_epochs and (epoch + 1) % t.eval_every_epochs == 0) or last_epoch:
            with self.window.paused():
                self.last_eval = self.evaluate(epoch)
            self.records.wb.log({f"val/{k[4:]}": v for k, v in self.last_eval.items()}, step=engine.global_steps)
            self.records.write(f"[ds_ext] epoch {epoch + 1}/{t.epochs} step {engine.global_steps}: "
                               f"val acc {self.last_eval['val_acc']:.4f} loss {self.last_eval['val_loss']:.4f}")
        if (ce.every_epochs and (epoch + 1) % ce.every_epochs == 0) or \
                (last_epoch and (ce.every_epochs or ce.every_steps)):
            with self.window.paused():
                self.save(epoch, self.steps_per_epoch)

    # ---- save, evaluate, finish -------------------------------------------------------------------
    def save(self, epoch: int, step_in_epoch: int) -> Optional[Path]:
        """A checkpoint after optimizer step ``step_in_epoch`` of ``epoch`` (collective); None when the last
        steps were skipped for non-finite gradients (the previous checkpoint is kept)."""
        att, engine, ce = self.att, self.engine, self.ce
        att.check_pending()  # a method that produced a non-finite gradient must not be checkpointed
        streak = max(gather_objects(self.skip_streak[0]))  # skips on local steps differ between ranks
        if streak:  # never replace a good checkpoint with a model that is diverging
            self.records.write(f"[ds_ext] step {engine.global_steps}: checkpoint not saved: the last {streak} "
                               f"optimizer step(s) were skipped for non-finite gradients; the previous checkpoint "
                               f"is kept")
            return None
        if step_in_epoch == self.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        # the epoch's running loss sum (read here, at a save, not per step): a resumed epoch's mean is exact
        loss_sum, count = self.epoch_loss
        el = None if step_in_epoch == 0 or loss_sum is None else (loss_sum.detach().cpu().clone(), count)
        st = {"rng": rng_state(), "epoch": epoch, "step_in_epoch": step_in_epoch, "attachment": att.state_dict(),
              "order": self.order.state_dict(), "global_step": engine.global_steps, "epoch_loss": el}
        ckpt.verify_all(self.locks)  # rank 0: a deleted lock file is put back (issue 28, M2)
        try:
            path = ckpt.save(engine, ce.dir, f"step_{engine.global_steps:07d}", st, self.meta, keep=ce.keep,
                             integrity=ce.integrity, job=self.job["job"])
        except ckpt.CheckpointSaveError as e:
            raise _Exit(ExitCode.SAVE, f"[ds_ext] error: {e}; stopping (exit {ExitCode.SAVE}); free space and "
                                       f"resume with --set checkpoint.resume=auto") from None
        self.records.write(f"[ds_ext] checkpoint {path}")
        return path

    def evaluate(self, epoch: int) -> dict:
        """The validation loss and accuracy over all ranks (after ``epoch``)."""
        recipe, order, micro = self.recipe, self.order, self.micro

        # training batches for BatchNorm re-estimation (local methods with bn_batches > 0)
        def train_batches():
            return iter(self.bundle.loader("train", order.epoch_indices(epoch), micro, recipe.data.num_workers,
                                           seed=epoch))

        faults.progress(self.engine.global_steps, "evaluation")
        with self.att.sync.eval_view(self.engine.module, train_batches):
            res = evaluate(self.engine, self.bundle, recipe.data.eval_micro_batch_size or 2 * micro, self.rank,
                           self.world, self.att.comm)
        if math.isfinite(res["val_loss"]):
            return res
        # the same all-reduced value on every rank: every rank stops; the parameters say why (read once, here)
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())
        why = ("the parameters are finite, so non-finite validation inputs (the data) or outputs that overflow "
               "are the cause" if finite else
               "the parameters hold non-finite values: lower optimizer.lr, add warm-up or deepspeed.gradient_clipping")
        raise _Exit(ExitCode.DIVERGED,
                    f"[ds_ext] error: training diverged: validation loss {res['val_loss']} after epoch {epoch + 1} "
                    f"(step {self.engine.global_steps}; {res.get('val_nonfinite', 0)} of {res['val_total']} "
                    f"validation losses non-finite); {why}; resume from a checkpoint saved before it diverged "
                    f"(exit {ExitCode.DIVERGED})")

    def finish(self) -> int:
        """The end of the last epoch: the final evaluation (when the last epoch had none), the summary (wandb,
        ``summary.json``, the final lines: ``saying``'s around the result)."""
        engine, meter, att = self.engine, self.sent, self.att
        meter.steps = self.meter.steps  # world size 1: the steps of the run, nothing communicated in them
        self.records.close()
        att.check_pending()
        elapsed = time.perf_counter() - self.t0
        if not self.last_eval:
            self.last_eval = self.evaluate(self.t.epochs - 1)
        parts = saying.parts(meter, self.who, self.world)
        summary = {"recipe": self.recipe.source, "world_size": self.world, "steps": engine.global_steps,
                   "epochs": self.t.epochs, **self.names, **self.last_eval,
                   "epoch_losses": self.records.epoch_losses(), "comm_bytes_total": meter.total_bytes,
                   "comm_bytes_per_step": meter.total_bytes / max(meter.steps, 1),
                   "comm_bytes_by_kind": dict(meter.by_kind), "comm_bytes_by_purpose": parts, "train_seconds": elapsed,
                   "skipped_steps": att.skipped_steps, "nonfinite_events": [list(e) for e in att.nonfinite_events]}
        self.records.wb.log({"summary/val_acc": self.last_eval.get("val_acc", 0.0),
                             "summary/comm_bytes": meter.total_bytes,
                             **{f"summary/comm_bytes/{purpose_key(k)}": v for k, v in meter.by_purpose().items()}},
                            step=engine.global_steps)
        last = saying.last_lines(self.world, self.recipe.source, self.records.wb.run)  # before finish() ends the run
        self.records.finish()
        if self.is0:
            print(saying.prefixed(att.summary()))
        err = self.records.summary(summary, parts, meter)  # rank 0 writes; a failed write: the reason
        self.records.curves(summary)  # rank 0: <log.dir>/curves.png
        err = gather_objects(err)[0]  # rank 0's verdict for every rank (the barrier this was)
        if err:
            saved = ckpt.complete_checkpoints(self.ce.dir)
            kept = f"the newest checkpoint is {saved[0]}" if saved else "no checkpoint was taken"
            raise _Exit(ExitCode.SAVE, f"[ds_ext] error: the run finished but its summary could not be written: "
                                       f"{err}; the results are in the lines above, {kept} (exit {ExitCode.SAVE})")
        if self.is0 and last:
            print(saying.prefixed(last), flush=True)
        return 0
