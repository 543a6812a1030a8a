"""The trainer's run records: console progress, the library's log lines on the console, the run directory's
records (``history.jsonl``), wandb logging, step timing.

Messages of this module go to its ``logging`` logger, except the trainer's own console output
(``Progress``, ``ConsoleHandler``), which prints.

Console: the trainer prints its own lines; the library logs through ``logging`` under the ``ds_ext``
logger, which the trainer's CLI routes to stderr as ``[ds_ext] <message>`` while it runs (``console_logging``):
WARNING and above from every rank, plus INFO from ``ds_ext.data`` (what a data set reader found, e.g.
criteo's ``field_dims``) on rank 0. A program that configures the ``ds_ext`` logger itself (gives it a
handler) before calling the trainer keeps its configuration.

Run directory (``log.dir``, rank 0): ``summary.json`` (written at the end: the result, ``epoch_losses`` (the
training loss of every epoch averaged over ALL ranks, logged as ``train/epoch_loss_all_ranks`` on the epoch's
last step; ``train/loss`` is rank 0's) and the logged ``history`` of the whole run, across resumes),
``history.jsonl`` (one logged record per line, appended on logging steps; a resumed run keeps the records up
to its checkpoint's step and drops later ones),
``wandb_run_id`` (a resumed run continues that wandb run), ``wandb/`` and, at the end, ``curves.png`` (the run's
loss, bytes and step time: ``ds_ext.trainer.compare``; needs matplotlib, the ``plots`` extra; ``DS_EXT_CURVES=0``:
not drawn).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..deepspeed.announce import rank_now  # the one rank rule, shared with the attach lines

log = logging.getLogger(__name__)


class Progress:
    """Rank-0 progress over optimizer steps: a tqdm bar on a terminal; in a log file (not a TTY),
    one plain line every ~5% of training instead of carriage-return spam. Silent on other ranks.

    This is the trainer's console UI, so it prints (stderr) rather than logging through ``ds_ext``'s
    logger: it is built by ``ds_ext.trainer.loop`` only, never by library code a user embeds.

    ``enabled`` switches the progress display (``log.progress``); ``console`` (None: the same as
    ``enabled``) switches the messages of ``write`` (checkpoint paths, per-epoch validation), which are
    printed even when the progress display is off (the trainer passes ``console=(rank == 0)``)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train", console: Optional[bool] = None):
        self.bar = None
        self.enabled = enabled
        self.console = enabled if console is None else bool(console)
        self.total, self.n = total, initial
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            pf = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"[ds_ext] step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) {pf} "
                  f"elapsed {time.perf_counter() - self.t0:.1f}s", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        """One message line on stderr (flushed) when ``console`` is on; through the bar when there is one,
        so that the bar is redrawn below the line."""
        if not self.console:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
            sys.stderr.flush()
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


RUN_ID_FILE = "wandb_run_id"


def _new_run_id() -> str:
    """A fresh wandb run id (8 characters of [a-z0-9], as wandb's own)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbLogger:
    """wandb on rank 0. ``offline`` (default) never touches the network; ``online`` falls back to
    offline when the service cannot be reached within the init timeout; ``disabled`` imports nothing
    and writes nothing.

    ``name``: the run name when ``cfg.name`` is unset (the trainer passes the recipe's ``name``, else the
    recipe file's stem). The run id is kept in ``<run_dir>/wandb_run_id``: a run started with
    ``resume=True`` (it continues a checkpoint) reuses the id found there, so its records go to the same
    wandb run (``wandb.init(id=..., resume="allow")``; offline, each segment is its own
    ``offline-run-*-<id>`` directory and ``wandb sync`` appends them to one run); a fresh run writes a new
    id. wandb keeps a run's steps increasing, so records of a run resumed from an older checkpoint than
    its last, at steps it had already logged, may be dropped by wandb (``summary.json`` has them)."""

    def __init__(self, cfg, run_dir: str, config: dict, enabled: bool, name: Optional[str] = None,
                 resume: bool = False):
        self.run = None
        self.run_id: Optional[str] = None
        if not enabled or cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DIR", run_dir)
        os.makedirs(run_dir, exist_ok=True)
        self.run_id = self._run_id(Path(run_dir) / RUN_ID_FILE, resume)
        import wandb

        kw = dict(project=cfg.project, entity=cfg.entity, name=cfg.name or name, tags=list(cfg.tags), config=config,
                  dir=run_dir, id=self.run_id, resume="allow")
        try:
            self.run = wandb.init(mode=cfg.mode, settings=wandb.Settings(init_timeout=60), **kw)
        except Exception as e:  # network trouble must not stop training
            log.warning("wandb %s init failed (%s); logging offline instead", cfg.mode, e)
            self.run = wandb.init(mode="offline", **kw)

    @staticmethod
    def _run_id(path: Path, resume: bool) -> str:
        if resume:
            try:
                got = path.read_text().strip()
            except OSError:
                got = ""
            if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", got):
                return got
        rid = _new_run_id()
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(rid + "\n")
        os.replace(tmp, path)
        return rid

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class StepWindow:
    """Step time and throughput over a logging window, from host-side timers only (no device read).

    ``step(samples)`` counts one optimizer step; ``read()`` returns ``(seconds per step, samples per
    second)`` since the previous ``read`` and opens the next window. Time inside ``paused()`` (checkpoint
    saves, evaluation) is left out. The trainer reads it right after the loss read of a logging step, so
    the work queued on an accelerator up to that step is inside the window it belongs to."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps = 0
        self.samples = 0
        self.excluded = 0.0

    def step(self, samples: int) -> None:
        self.steps += 1
        self.samples += int(samples)

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def read(self) -> Tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.t0 - self.excluded, 1e-9)
        out = (dt / max(self.steps, 1), self.samples / dt)
        self.t0, self.steps, self.samples, self.excluded = now, 0, 0, 0.0
        return out


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


CONSOLE_FORMAT = "[ds_ext] %(message)s"


class ConsoleFilter(logging.Filter):
    """What the trainer shows of the library's records: WARNING and above from every rank; INFO from
    ``ds_ext.data`` (data set readers) on rank 0 only, as the trainer printed them before they were logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        data = record.name == "ds_ext.data" or record.name.startswith("ds_ext.data.")
        return record.levelno >= logging.INFO and data and rank_now() == 0


class ConsoleHandler(logging.Handler):
    """``[ds_ext] <message>`` lines on the current ``sys.stderr`` (flushed); through tqdm when a progress
    bar is showing, so the bar is redrawn below the line."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        self.addFilter(ConsoleFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            tq = sys.modules.get("tqdm")
            if tq is not None and getattr(getattr(tq, "tqdm", None), "_instances", None):
                tq.tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def console_logging() -> Iterator[Optional[logging.Handler]]:
    """While the trainer runs: the ``ds_ext`` logger's records on stderr through a ``ConsoleHandler``
    (yielded), with ``propagate`` off so that a handler on the root logger (DeepSpeed's or the user's)
    does not print them a second time, and the logger's level set to INFO when it has none (the handler
    filters; a level the user set, e.g. CRITICAL to silence the library, is kept). Everything is put back
    on exit (``main`` may be called in-process). When the ``ds_ext`` logger already has a handler (the
    caller configured it), nothing is changed and None is yielded."""
    lg = logging.getLogger("ds_ext")
    if lg.handlers:
        yield None
        return
    handler = ConsoleHandler()
    level, propagate = lg.level, lg.propagate
    lg.addHandler(handler)
    lg.propagate = False
    if level == logging.NOTSET:
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        lg.removeHandler(handler)
        lg.propagate = propagate
        lg.setLevel(level)


HISTORY_FILE = "history.jsonl"


def run_name(recipe) -> Optional[str]:
    """The wandb run name: ``log.wandb.name``, else the recipe's ``name``, else the recipe file's stem
    (None for a recipe built in memory: wandb then picks one)."""
    src = recipe.source or ""
    return (recipe.log.wandb.name or recipe.name
            or (Path(src).stem if src and not src.startswith("<") else None))


CURVES_ENV = "DS_EXT_CURVES"


def run_name_of(summary: dict, run_dir: str) -> str:
    """A title for a run's picture: its directory and method, e.g. ``my: reducer=powersgd sync=none``."""
    method = " ".join(f"{k}={summary[k]}" for k in ("reducer", "sync", "order") if k in summary)
    return f"{Path(run_dir).name}: {method}" if method else Path(run_dir).name


def _history_start(run_dir: str, upto: Optional[int]) -> List[dict]:
    """Rank 0, before the first step: the logged records this run continues. A fresh run (``upto`` None)
    starts empty; a resumed one keeps ``<run_dir>/history.jsonl``'s records up to step ``upto`` (its
    checkpoint's; later ones belong to a timeline that is being replaced) in step order, one per step.
    The file is rewritten to that (atomically) and then appended to by ``_history_append``."""
    path = Path(run_dir, HISTORY_FILE)
    kept: dict = {}
    if upto is not None:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for line in lines:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, TypeError, KeyError):  # a line cut short by a killed process
                continue
            if step <= upto:
                kept[step] = rec
    out = [kept[k] for k in sorted(kept)]
    try:
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in out))
    except OSError as e:  # the records stay in memory (summary.json); the file keeps what it held
        _history_warn(path, e)
    return out


_history_failed: List[str] = []


def _history_warn(path: Path, e: OSError) -> None:
    if not _history_failed:  # once per process
        print(f"[ds_ext] warning: cannot write {path} ({e}); summary.json will still hold this run's history",
              file=sys.stderr)
        _history_failed.append(str(path))


def _history_append(run_dir: str, rec: dict) -> None:
    """One record appended; a write the file system refuses is cut back off (no half line stays for a
    later record to join) and warned about once."""
    path = Path(run_dir, HISTORY_FILE)
    try:
        with open(path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            data = memoryview((json.dumps(rec) + "\n").encode())
            try:
                while data:  # a raw write may take part of it and refuse the rest on the next call
                    data = data[f.write(data):]
            except OSError:
                os.ftruncate(f.fileno(), end)
                raise
    except OSError as e:
        _history_warn(path, e)


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it (written, fsynced, renamed over ``path``):
    ``path`` holds the old content or the new, never a part. A failed write removes the temporary file and
    raises the ``OSError`` (``ds_ext.deepspeed.checkpoint.write_atomic``, the checkpoints' own rule)."""
    from ..deepspeed.checkpoint import write_atomic

    write_atomic(path, text.encode())


SUMMARY_FILE = "summary.json"


class RunRecords:
    """What rank 0 shows and keeps of one training run: its console lines (``say``; ``write`` goes through
    the progress bar), the progress bar, wandb, ``history.jsonl`` and ``summary.json``. Every rank builds
    one (the trainer's calls are the same on every rank); wandb and the bar are off and nothing is printed
    or written elsewhere."""

    def __init__(self, rank0: bool, run_dir: str):
        self.is0, self.run_dir = rank0, run_dir
        self.history: List[dict] = []
        self.wb: Optional[WandbLogger] = None
        self.bar: Optional[Progress] = None

    def say(self, line: str) -> None:
        """Rank 0: one line on stderr."""
        if self.is0:
            print(line, file=sys.stderr)

    def write(self, line: str) -> None:
        """Rank 0: one line on stderr through the progress bar (redrawn below it)."""
        if self.is0:
            self.bar.write(line)

    def open(self, recipe, start_line: str, total_steps: int, step: int, resumed: bool) -> None:
        """The run directory, the start-up line, the history this run continues (up to ``step`` when
        ``resumed``), wandb (continuing the run's wandb run when resumed) and the progress bar."""
        if self.is0:
            os.makedirs(self.run_dir, exist_ok=True)
            print(start_line, file=sys.stderr)
        self.history = _history_start(self.run_dir, step if resumed else None) if self.is0 else []
        self.wb = WandbLogger(recipe.log.wandb, self.run_dir, recipe.model_dump(mode="json"), enabled=self.is0,
                              name=run_name(recipe), resume=resumed)
        self.bar = Progress(total_steps, step, enabled=self.is0 and recipe.log.progress, console=self.is0)

    def log(self, rec: dict, step: int) -> None:
        """A logging step's record: to wandb and (rank 0) to the history."""
        self.wb.log(rec, step=step)
        if self.is0:
            self.history.append({"step": step, **rec})
            _history_append(self.run_dir, self.history[-1])

    def epoch_losses(self) -> List[float]:
        """The all-rank training loss of every epoch, from the logged records (a resumed run keeps the earlier
        ones)."""
        return [r["train/epoch_loss_all_ranks"] for r in self.history if "train/epoch_loss_all_ranks" in r]

    def close(self) -> None:
        """The progress bar's end (wandb stays open for the summary)."""
        self.bar.close()

    def finish(self) -> None:
        self.wb.finish()

    def curves(self, summary: dict) -> None:
        """Rank 0: ``<run_dir>/curves.png`` (``ds_ext.trainer.compare.write_curves``) from the history and
        ``summary``. Without matplotlib, or when it cannot be drawn, one line says so; never an exception.
        ``DS_EXT_CURVES=0`` leaves it out (the test suite does: about 1 s of CPU per run for matplotlib)."""
        if not self.is0 or os.environ.get(CURVES_ENV, "1").strip() == "0":
            return
        from .compare import INSTALL_HINT, write_curves

        try:
            write_curves(self.run_dir, self.history, summary, title=run_name_of(summary, self.run_dir))
        except ImportError:
            print(f"[ds_ext] no curves.png: matplotlib is not installed; {INSTALL_HINT}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 -- a picture must never fail a finished run
            print(f"[ds_ext] curves.png not drawn: {type(e).__name__}: {e}", file=sys.stderr)

    def summary(self, summary: dict, parts: dict, meter) -> Optional[str]:
        """Rank 0: ``summary.json`` (``summary`` and the history, written atomically: a failed write leaves the
        previous file, if any, whole) and the final lines: validation, the bytes per rank of ``meter`` (split by
        ``parts``: its purposes named by method), the train time, skipped steps. Returns why ``summary.json``
        could not be written (the file and the operating system's reason), else None."""
        if not self.is0:
            return None
        from ..deepspeed.checkpoint import free_space
        from ..meter import human_bytes

        path, err = Path(self.run_dir, SUMMARY_FILE), None
        try:
            write_atomically(path, json.dumps({**summary, "history": self.history}, indent=1))
        except OSError as e:
            code = errno.errorcode.get(e.errno, e.errno) if e.errno is not None else type(e).__name__
            err = f"{path}: {e.strerror or e} (errno {code}); {free_space(path.parent)} on that file system"
        print(f"[ds_ext] final: val accuracy {summary['val_acc']:.4f} ({summary['val_correct']}/"
              f"{summary['val_total']}), val loss {summary['val_loss']:.4f}, {summary['steps']} steps")
        split = ", ".join(f"{k} {human_bytes(v / max(meter.steps, 1))}" for k, v in parts.items()) \
            if len(parts) > 1 else next(iter(parts), "nothing metered")
        sent = (f"communicated {human_bytes(meter.total_bytes)} per rank over {meter.steps} steps "
                f"({human_bytes(summary['comm_bytes_per_step'])}/step; {split})"
                if summary.get("world_size", 2) > 1 else f"{split} over {meter.steps} steps")
        print(f"[ds_ext] {sent}, train time {summary['train_seconds']:.1f} s; "
              f"summary {'not written' if err else path}")
        if summary["skipped_steps"]:
            print(f"[ds_ext] {summary['skipped_steps']} optimizer step(s) skipped for non-finite gradients (rank 0's "
                  f"count; summary.json lists step and ranks)")
        return err
