"""The trainer's training loop: ``train(recipe)`` starts the process group and runs one recipe on every rank.

The command line is ``ds_ext.trainer.cli``; the console lines of the library, ``history.jsonl`` and the
run directory's other records are ``ds_ext.trainer.records``.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import List, Optional

from .exit_codes import ExitCode

class _Exit(Exception):
    """Leave the run on purpose with ``code``; rank 0 prints ``message`` (the same verdict on every rank)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message



def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _batch_loader(dataset, batches, num_workers: int, seed: int):
    """A ``DataLoader`` yielding one microbatch per list of ``batches`` (example indices; the lists may differ
    in length: ``remainder: visit`` of the dgrab orders), with ``make_loader``'s settings otherwise."""
    import torch
    from torch.utils.data import DataLoader

    from ..stop_signals import ignore_stop_signals

    return DataLoader(dataset, batch_sampler=[list(b) for b in batches], num_workers=num_workers,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals if num_workers > 0 else None)


def evaluate(engine, bundle, batch_size: int, rank: int, world: int, comm=None) -> dict:
    """Each rank scores a strided shard of the validation set; the sums stay on the communication
    device (no host read per batch), are all-reduced there and read once."""
    import torch
    import torch.nn.functional as F

    from ..comm import Communicator

    comm = comm if comm is not None else Communicator()
    module = engine.module
    p0 = next(module.parameters())
    was_training = module.training
    module.eval()
    stats = comm.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, y in bundle.loader("val", range(rank, len(bundle.val), world), batch_size, drop_last=False):
            x = x.to(p0.device, dtype=p0.dtype if x.is_floating_point() else x.dtype, non_blocking=True)
            out = module(x).float()
            y = y.to(out.device, non_blocking=True)
            stats[0] += F.cross_entropy(out, y, reduction="sum").to(stats.device, torch.float64)
            stats[1] += (out.argmax(1) == y).sum().to(stats.device, torch.float64)
            stats[2] += y.numel()  # tokens for a language model
    comm.all_reduce(stats)
    module.train(was_training)
    loss_sum, correct, total = stats.tolist()
    n = max(total, 1.0)
    return {"val_loss": loss_sum / n, "val_acc": correct / n, "val_correct": int(correct), "val_total": int(total)}


def train(recipe) -> int:
    """Start the process group, run the training (``_train``) and make every way out explicit.

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

    from . import checkpoint as ckpt
    from . import faults
    from ..comm import init_distributed
    from ..registry import REDUCERS, load_builtin

    init_distributed(recipe.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        faults.load_fault_plan(rank)
    except faults.FaultSpecError as e:  # the same environment on every rank
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return ExitCode.RECIPE
    faults.progress(0, "start-up")
    # saving on a signal needs a per-step stop vote, which rides on the gradient exchange (engine.StopVote)
    load_builtin()
    votes = world == 1 or REDUCERS.get(recipe.method.reducer.name).factory.communicates_gradients
    on_signal = recipe.checkpoint.on_signal if votes else "exit"
    wd = faults.Watchdog.start(rank, world, on_signal=on_signal)
    if wd is None:
        faults.install_signal_handlers(on_signal)
    code, reason = 1, "exception"
    locks: list = []
    try:
        code = _train(recipe, rank, world, locks)
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


def _train(recipe, rank: int, world: int, locks: list) -> int:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from . import checkpoint as ckpt
    from . import faults
    from ..comm import gather_objects
    from ..deepspeed.attach import initialize
    from ..meter import CommMeter, human_bytes, purpose_key
    from .records import Progress, StepWindow, WandbLogger, _history_append, _history_start, run_name
    from .recipe import RecipeError
    from ..registry import DATASETS, MODELS, ORDERS

    is0 = rank == 0
    try:
        micro, gas = recipe.batch_plan(world)
    except RecipeError as e:  # same verdict on every rank, so every rank exits
        if is0:
            print(f"recipe error:\n{e}", file=sys.stderr)
        return ExitCode.RECIPE
    ce = recipe.checkpoint
    # one job per run and checkpoint directory, for the whole run (rank 0 holds the locks)
    job, busy = None, None
    if is0:
        job = ckpt.job_identity()
        try:
            locks.extend(ckpt.lock_dirs([recipe.log.dir, ce.dir], job))
        except ckpt.DirectoryBusy as e:
            busy = str(e)
    job, busy = gather_objects((job, busy))[0]  # rank 0's
    if busy:
        raise _Exit(ExitCode.BUSY, f"error: {recipe.source}: {busy}")
    # the checkpoint to resume from (every rank verifies a share of it and all choose alike), and
    # whether this run may continue it
    meta = ckpt.run_meta(recipe, world)
    notes: List[str] = []
    try:
        resume_path = ckpt.choose(ce.resume, ce.dir, ce.integrity, warn=notes.append)
        if resume_path is not None:
            ckpt.check_meta(resume_path, meta)
    except ckpt.CheckpointError as e:
        raise _Exit(ExitCode.CHECKPOINT, f"checkpoint error:\n{recipe.source}: checkpoint.resume: {e}") from None
    if is0:
        for n in notes:
            print(f"[ds_ext] warning: checkpoint.resume: {n}", file=sys.stderr)
        earlier = ckpt.complete_checkpoints(ce.dir) if resume_path is None else []
        if earlier:
            print(f"[ds_ext] checkpoint.resume={json.dumps(ce.resume)}: {ce.dir} holds {len(earlier)} checkpoint(s) of an earlier "
                  f"run (newest {earlier[0].name}); this run starts afresh and its saves replace checkpoints of the "
                  f"same step", file=sys.stderr)

    t = recipe.train
    _seed_all(t.seed)  # identical model initialisation on every rank
    try:
        bundle = DATASETS.build(recipe.data.name, recipe.data.options, root=recipe.data.root)
    except (FileNotFoundError, ImportError, ValueError) as e:  # same files on every rank: every rank exits
        if is0:
            print(f"data error: {recipe.source}: data ({recipe.data.name}): {e}", file=sys.stderr)
        return ExitCode.DATA
    model = MODELS.build(recipe.model.name, recipe.model.options, data=bundle)  # sizes from the data (vocab, fields)
    order = ORDERS.build(recipe.method.order.name, recipe.method.order.options, len(bundle.train), rank, world, t.seed)
    micro_per_epoch = order.shard_size // micro
    steps_per_epoch = micro_per_epoch // gas
    if t.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.steps_per_epoch)
    if steps_per_epoch >= 1:  # gradient-driven orders may need fewer (D-GraB: an even microbatch count)
        try:
            steps_per_epoch, note = order.plan(micro, gas, steps_per_epoch)
        except ValueError as e:  # same verdict on every rank
            if is0:
                print(f"recipe error:\n{recipe.source}: method.order: {e}", file=sys.stderr)
            return ExitCode.RECIPE
        if note and is0:
            print(f"[ds_ext] {note}", file=sys.stderr)
    variable_units = bool(getattr(order, "variable_units", False))  # dgrab remainder: visit
    if variable_units and getattr(bundle, "loader_factory", None) is not None:
        if is0:
            print(f"recipe error:\n{recipe.source}: method.order: remainder: visit makes microbatches of different "
                  f"sizes, which data set {recipe.data.name!r}'s own loader cannot serve; use remainder: drop",
                  file=sys.stderr)
        return ExitCode.RECIPE
    if steps_per_epoch < 1:
        if is0:
            print(f"recipe error:\n{recipe.source}: train.global_batch_size: {t.global_batch_size} exceeds the "
                  f"{order.shard_size * world} training examples usable on {world} ranks", file=sys.stderr)
        return ExitCode.RECIPE
    total_steps = steps_per_epoch * t.epochs

    meter = CommMeter()
    engine, att, schedule = initialize(recipe, model, steps_per_epoch, meter, order=order)
    _seed_all(t.seed + 1 + rank)  # per-rank stream for dropout / augmentation
    p0 = next(engine.module.parameters())
    names = recipe.method_names()

    start_epoch, start_step = 0, 0
    resumed_epoch_loss = None  # (sum of this rank's microbatch losses so far in the epoch, their count)
    if resume_path is not None:
        faults.progress(0, f"loading checkpoint {resume_path.name}")
        err = None
        try:
            state = ckpt.load(engine, resume_path, rank, world, step=ckpt.read_meta(resume_path).get("step"))
            att.load_state_dict(state["attachment"])
            order.load_state_dict(state["order"])
            _set_rng_state(state["rng"])
            start_epoch, start_step = state["epoch"], state["step_in_epoch"]
            resumed_epoch_loss = state.get("epoch_loss")  # absent in checkpoints of older versions
        except ckpt.CheckpointError as e:
            err = str(e)
        except Exception as e:  # a rank file whose content does not fit this run's state
            if faults.looks_distributed(e):
                raise
            err = (f"{ckpt.rank_file(resume_path, rank)}: does not fit this run ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:160]})")
        err = ckpt.shared_verdict(err)  # every rank's verdict before anyone says "resumed"
        if err:
            raise _Exit(ExitCode.CHECKPOINT, f"checkpoint error:\n{recipe.source}: checkpoint.resume: {err}")
        if is0:
            print(f"[ds_ext] resumed from {resume_path} at step {engine.global_steps} "
                  f"(epoch {start_epoch}, step {start_step} of {steps_per_epoch})", file=sys.stderr)

    run_dir = recipe.log.dir
    if is0:
        os.makedirs(run_dir, exist_ok=True)
        rem = getattr(order, "remainder_note", None)  # dgrab / cdgrab: what happens to each shard's remainder
        rem = rem() if rem is not None else None
        print(f"[ds_ext] {recipe.source}: world {world}, micro batch {micro} x accumulation {gas} = global "
              f"{t.global_batch_size}; {steps_per_epoch} steps/epoch x {t.epochs} epochs; "
              f"reducer={names['reducer']} sync={names['sync']} order={names['order']} "
              f"precision={recipe.precision()}; {f'{rem}; ' if rem else ''}run dir {run_dir}", file=sys.stderr)
    history = _history_start(run_dir, engine.global_steps if resume_path is not None else None) if is0 else []
    wb = WandbLogger(recipe.log.wandb, run_dir, recipe.model_dump(mode="json"), enabled=is0, name=run_name(recipe),
                     resume=resume_path is not None)
    bar = Progress(total_steps, engine.global_steps, enabled=is0 and recipe.log.progress, console=is0)
    att.vote_stop(lambda: faults.stop_requested() is not None)
    skip_streak = [0, 0]  # consecutive skipped steps on this rank, the last step that was not skipped

    def save(epoch: int, step_in_epoch: int) -> Optional[Path]:
        att.check_pending()  # a method that produced a non-finite gradient must not be checkpointed
        streak = max(gather_objects(skip_streak[0]))  # skips on local steps differ between ranks
        if streak:  # never replace a good checkpoint with a model that is diverging
            if is0:
                bar.write(f"[ds_ext] step {engine.global_steps}: checkpoint not saved: the last {streak} optimizer "
                          f"step(s) were skipped for non-finite gradients; the previous checkpoint is kept")
            return None
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        # the epoch's running loss sum (read here, at a save, not per step): a resumed epoch's mean is exact
        el = None if step_in_epoch == 0 or epoch_loss[0] is None else \
            (epoch_loss[0].detach().cpu().clone(), epoch_loss[1])
        st = {"rng": _rng_state(), "epoch": epoch, "step_in_epoch": step_in_epoch, "attachment": att.state_dict(),
              "order": order.state_dict(), "global_step": engine.global_steps, "epoch_loss": el}
        try:
            path = ckpt.save(engine, ce.dir, f"step_{engine.global_steps:07d}", st, meta, keep=ce.keep,
                             integrity=ce.integrity, job=job["job"])
        except ckpt.CheckpointSaveError as e:
            raise _Exit(ExitCode.SAVE, f"[ds_ext] error: {e}; stopping (exit {ExitCode.SAVE}); free space and "
                                        f"resume with --set checkpoint.resume=auto") from None
        if is0:
            bar.write(f"[ds_ext] checkpoint {path}")
        return path

    def eval_now(epoch: int) -> dict:
        # training batches for BatchNorm re-estimation (local methods with bn_batches > 0)
        def train_batches():
            return iter(bundle.loader("train", order.epoch_indices(epoch), micro, recipe.data.num_workers,
                                      seed=epoch))

        faults.progress(engine.global_steps, "evaluation")
        with att.sync.eval_view(engine.module, train_batches):
            return evaluate(engine, bundle, recipe.data.eval_micro_batch_size or 2 * micro, rank, world, att.comm)

    # what the bytes were for, naming the method that sent them (metrics.PURPOSES; the rest is the reducer's)
    who = {"gradient exchange": f"reducer={names['reducer']}", "parameter averaging": f"sync={names['sync']}",
           "order balancing": f"order={names['order']}"}

    def purposes() -> dict:
        return {f"{k} ({who[k]})" if k in who else k: v for k, v in meter.by_purpose().items()}

    def epoch_loss_all_ranks() -> float:
        """The epoch's training loss over all ranks: each rank's mean microbatch loss (summed on the device
        during the epoch), averaged over the ranks by one all-reduce (control data, not metered), read once.
        Every rank runs the same number of microbatches, so this is the mean over all microbatches."""
        total, count = epoch_loss
        v = (total.detach().to(att.comm.device, torch.float64) / max(count, 1)).reshape(1)
        return float(att.comm.all_reduce_mean(v))

    smoothing = t.label_smoothing
    window = StepWindow()  # step time and samples/s between logging steps (host timers)
    order_stats = getattr(order, "stats", None)
    last_eval = {}
    last_loss = float("nan")  # the last logged training loss (the progress bar shows it)
    t0 = time.perf_counter()
    samples_done = 0
    skips_seen = att.skipped_steps
    epoch_loss: list = [None, 0]
    for epoch in range(start_epoch, t.epochs):
        skip = start_step if epoch == start_epoch else 0
        if hasattr(bundle.train, "set_epoch"):  # e.g. NCF draws fresh negatives every epoch
            bundle.train.set_epoch(epoch)
        loader_seed = (t.seed * 1_000_003 + epoch) * 4099 + rank
        if variable_units:  # microbatches of different sizes: one list of indices per microbatch
            units = order.epoch_batches(epoch)[: steps_per_epoch * gas]
            loader = _batch_loader(bundle.train, units[skip * gas:], recipe.data.num_workers, loader_seed)
        else:
            idx = order.epoch_indices(epoch)[: steps_per_epoch * gas * micro]
            loader = bundle.loader("train", idx[skip * gas * micro:], micro, recipe.data.num_workers, seed=loader_seed)
        step_in_epoch, loss_acc, n_micro = skip, None, 0  # the loss stays on the device until a logging step
        # the epoch's loss sum on this rank (device) and microbatch count: all-reduced at the epoch's end
        epoch_loss = [None, 0]
        if epoch == start_epoch and skip and resumed_epoch_loss is not None:
            epoch_loss = [resumed_epoch_loss[0].to(p0.device), int(resumed_epoch_loss[1])]
        batches = iter(loader)
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
            loss = F.cross_entropy(out.float(), y, label_smoothing=smoothing)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:  # the reducer's collectives were launched during backward; step() waits for them
                faults.progress(step, "gradient collectives and optimizer step")
                faults.point("collective", step)
            engine.step()
            loss_acc = loss.detach() if loss_acc is None else loss_acc + loss.detach()
            n_micro += 1
            if not boundary:
                continue
            step_in_epoch += 1
            samples_done += t.global_batch_size
            window.step(t.global_batch_size)
            gstep = engine.global_steps
            if att.skipped_steps > skips_seen:  # host counters: no device read
                skip_streak[0] += 1
            else:
                skip_streak[:] = [0, gstep]
            skips_seen = att.skipped_steps
            if t.max_consecutive_skips and skip_streak[0] >= t.max_consecutive_skips:
                raise _Exit(ExitCode.DIVERGED,
                            f"[ds_ext] error: training diverged: {skip_streak[0]} optimizer steps in a row (up to step "
                            f"{gstep}) had non-finite gradients and were skipped (train.max_consecutive_skips="
                            f"{t.max_consecutive_skips}); last finite step {skip_streak[1]}; no checkpoint was saved "
                            f"since then. Lower optimizer.lr, add warm-up or deepspeed.gradient_clipping, and resume "
                            f"from the last checkpoint (exit {ExitCode.DIVERGED})")
            step_loss_t, micro_in_step = loss_acc, n_micro
            loss_acc, n_micro = None, 0
            epoch_loss[0] = step_loss_t if epoch_loss[0] is None else epoch_loss[0] + step_loss_t
            epoch_loss[1] += micro_in_step
            lr = schedule.get_last_lr()[0]
            if gstep % recipe.log.every_steps == 0 or step_in_epoch == steps_per_epoch:
                last_loss = float(step_loss_t) / micro_in_step  # the loss is read on logging steps only
                step_time, samples_per_s = window.read()  # after that read: the window's device work is done
                rec = {"train/loss": last_loss, "train/lr": lr, "train/step_time_s": step_time,
                       "train/samples_per_s": samples_per_s, "comm/bytes_step": meter.last_step_bytes,
                       "comm/bytes_total": meter.total_bytes, "epoch": epoch + step_in_epoch / steps_per_epoch}
                if step_in_epoch == steps_per_epoch:  # the epoch's last step: every rank is here
                    rec["train/epoch_loss_all_ranks"] = epoch_loss_all_ranks()
                rec.update({f"comm/bytes_total/{purpose_key(k)}": v for k, v in meter.by_purpose().items()})
                rec.update({f"reducer/{k}": v for k, v in att.reducer.stats().items()})
                rec["train/skipped_steps"] = att.skipped_steps  # non-finite gradients (train.nonfinite=skip)
                rec.update({f"sync/{k}": v for k, v in att.sync.stats().items()})
                if order_stats is not None:
                    rec.update({f"order/{k}": v for k, v in order_stats().items()})
                wb.log(rec, step=gstep)
                if is0:
                    history.append({"step": gstep, **rec})
                    _history_append(run_dir, history[-1])
            bar.update(1, loss=f"{last_loss:.4f}", lr=f"{lr:.3g}",
                       sps=f"{samples_done / max(time.perf_counter() - t0, 1e-9):.0f}")
            if att.stop_agreed and gstep < total_steps:  # a signal (preemption): every rank at this same step
                with window.paused():
                    path = save(epoch, step_in_epoch)
                bar.close()
                wb.finish()
                got = faults.stop_requested()
                raise _Exit(ExitCode.PREEMPTED,
                            f"[ds_ext] stopped at step {gstep} on {got or 'a signal to another rank'} "
                            f"(checkpoint.on_signal=save); "
                            + (f"saved {path}; resume with --set checkpoint.resume=auto" if path else
                               "nothing saved (see above)") + f" (exit {ExitCode.PREEMPTED})")
            stopping = t.stop_at_step is not None and gstep >= t.stop_at_step and gstep < total_steps
            if stopping or (ce.every_steps and gstep % ce.every_steps == 0 and gstep < total_steps):
                with window.paused():
                    save(epoch, step_in_epoch)
            if stopping:
                bar.close()
                if is0:
                    print(f"[ds_ext] stopped at step {gstep} (train.stop_at_step); resume with "
                          f"--set checkpoint.resume=auto", file=sys.stderr)
                wb.finish()
                att.comm.barrier()
                return 0
            if step_in_epoch == steps_per_epoch:
                break
        last_epoch = epoch + 1 == t.epochs
        if (t.eval_every_epochs and (epoch + 1) % t.eval_every_epochs == 0) or last_epoch:
            with window.paused():
                last_eval = eval_now(epoch)
            wb.log({f"val/{k[4:]}": v for k, v in last_eval.items()}, step=engine.global_steps)
            if is0:
                bar.write(f"[ds_ext] epoch {epoch + 1}/{t.epochs} step {engine.global_steps}: "
                          f"val acc {last_eval['val_acc']:.4f} loss {last_eval['val_loss']:.4f}")
        if (ce.every_epochs and (epoch + 1) % ce.every_epochs == 0) or (last_epoch and (ce.every_epochs or ce.every_steps)):
            with window.paused():
                save(epoch, steps_per_epoch)
    bar.close()
    att.check_pending()
    elapsed = time.perf_counter() - t0
    if not last_eval:
        last_eval = eval_now(t.epochs - 1)
    parts = purposes()
    # the all-rank training loss of every epoch, from the logged records (a resumed run keeps the earlier ones)
    epoch_losses = [r["train/epoch_loss_all_ranks"] for r in history if "train/epoch_loss_all_ranks" in r]
    summary = {"recipe": recipe.source, "world_size": world, "steps": engine.global_steps, "epochs": t.epochs,
               **names, **last_eval, "epoch_losses": epoch_losses, "comm_bytes_total": meter.total_bytes,
               "comm_bytes_per_step": meter.total_bytes / max(meter.steps, 1), "comm_bytes_by_kind": dict(meter.by_kind),
               "comm_bytes_by_purpose": parts, "train_seconds": elapsed,
               "skipped_steps": att.skipped_steps, "nonfinite_events": [list(e) for e in att.nonfinite_events]}
    wb.log({"summary/val_acc": last_eval.get("val_acc", 0.0), "summary/comm_bytes": meter.total_bytes,
            **{f"summary/comm_bytes/{purpose_key(k)}": v for k, v in meter.by_purpose().items()}},
           step=engine.global_steps)
    wb.finish()
    if is0:
        Path(run_dir, "summary.json").write_text(json.dumps({**summary, "history": history}, indent=1))
        print(f"[ds_ext] final: val accuracy {last_eval['val_acc']:.4f} ({last_eval['val_correct']}/"
              f"{last_eval['val_total']}), val loss {last_eval['val_loss']:.4f}, {engine.global_steps} steps")
        split = ", ".join(f"{k} {human_bytes(v / max(meter.steps, 1))}" for k, v in parts.items()) \
            if len(parts) > 1 else next(iter(parts), "nothing metered")
        print(f"[ds_ext] communicated {human_bytes(meter.total_bytes)} per rank over {meter.steps} steps "
              f"({human_bytes(summary['comm_bytes_per_step'])}/step; {split}), "
              f"train time {elapsed:.1f} s; summary {Path(run_dir, 'summary.json')}")
        if att.skipped_steps:
            print(f"[ds_ext] {att.skipped_steps} optimizer step(s) skipped for non-finite gradients (rank 0's "
                  f"count; summary.json lists step and ranks)")
    att.comm.barrier()
    return 0
