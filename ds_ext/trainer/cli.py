"""``ds-ext``: the one command line of ds_ext, with subcommands.

    ds-ext train --recipe recipes/X.yaml [--set k=v ...]          (also: deepspeed --module ds_ext.train ...)
    ds-ext check --recipe recipes/X.yaml [--set k=v ...] [--world-size N]
    ds-ext recipes list|show NAME|copy NAME [DEST]
    ds-ext methods list|show NAME|options NAME
    ds-ext report [--load]
    ds-ext schedule --recipe R [--set k=v ...] [--world-size N] [--steps-per-epoch N] [--csv]
    ds-ext costmodel ...

``python -m ds_ext.trainer.cli <subcommand>`` is the same without the installed script.

``train`` is the trainer (``python -m ds_ext.train`` and ``deepspeed [--hostfile H | --num_gpus N] --module
ds_ext.train`` run the same ``train_main``). ``train --check`` (= ``check``) validates the recipe (overrides,
per-host file, method combination, batch arithmetic for ``--world-size``, default $WORLD_SIZE or 1) and exits
0, or 2 with one line per problem, without starting training. The exit codes: ``ExitCode``
(``ds_ext/trainer/exit_codes.py``, listed by ``ds-ext train --help``). While the trainer runs, the library's
``logging`` records are shown on the console by ``ds_ext.trainer.records.console_logging``.

``schedule`` prints a recipe's synchronisation schedule (``ds_ext/sync/schedules.py``) without training: total
steps, sync rounds, fraction of steps that communicate, and the H in force at step 0 (the first round's) and at
10 %, 20 %, ..., 100 % of training (``--csv``: every round).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

from ..spec import near_miss_block
from .exit_codes import ExitCode
from .records import console_logging


def build_parser(prog: str = "python -m ds_ext.train") -> argparse.ArgumentParser:
    import textwrap

    from .recipe.bundled import bundled

    description = (
        "Train a recipe on every rank (--check: validate it only). For data parallel, start it with DeepSpeed's "
        "launcher:\n  deepspeed --num_gpus N --module ds_ext.train --recipe R       (one machine, N processes)\n"
        "  deepspeed --hostfile H --module ds_ext.train --recipe R        (several machines)\n"
        "Without a launcher it runs as one process (world size 1, nothing communicated). On CPU set "
        "DS_ACCELERATOR=cpu.")
    names = textwrap.fill(", ".join(sorted(bundled())), width=100, initial_indent="  ", subsequent_indent="  ",
                          break_on_hyphens=False)
    others = ", ".join(n for n in SUBCOMMANDS if n != "train")
    epilog = (f"bundled recipes (--recipe NAME; `ds-ext recipes show NAME` prints one):\n{names}\n\n"
              f"the other ds-ext subcommands (also python -m ds_ext SUBCOMMAND): {others}\n\n"
              "exit codes:\n" + "\n".join(f"  {line}" for line in ExitCode.table()))
    ap = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set train.epochs=3 (repeatable)")
    ap.add_argument("--host-config", default=None,
                    help="per-host paths file (default: $DS_EXT_HOST_CONFIG or ./.config_<hostname>.yml)")
    ap.add_argument("--check", action="store_true", help="validate the recipe and exit (0 ok, 2 errors)")
    ap.add_argument("--world-size", type=int, default=None, help="world size assumed by --check")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def missing_recipe_hint(name: str) -> str:
    """For a ``--recipe`` that is neither a file nor a bundled name: the bundled names, with the closest as a
    did-you-mean ("" when the file exists)."""
    import difflib
    from pathlib import Path

    from .recipe.bundled import bundled

    names = list(bundled())
    stem = Path(name).name.removesuffix(".yaml")
    if Path(name).is_file() or not names or (stem == name.removesuffix(".yaml") and stem in names):
        return ""
    close = difflib.get_close_matches(stem, names, n=1)
    mean = f"did you mean --recipe {close[0]}? " if close else ""
    return f"\n{mean}bundled recipes: {', '.join(names)} (a bundled name or the path of a recipe file)"


def check(recipe, world_size: int) -> int:
    from .recipe import data_problems, model_line, model_problems, parameter_count, path_problems

    micro, gas = recipe.check_world(world_size)
    count = parameter_count(recipe)
    # missing paths and a model larger than this host's memory are warnings here (a recipe may be linted where
    # its data is not mounted, on a smaller machine); a run refuses them
    for key, msg in path_problems(recipe) + data_problems(recipe) + model_problems(recipe, count):
        print(f"warning: {recipe.source}: {key}: {msg}", file=sys.stderr)
    names = recipe.method_names()
    print(f"ok: {recipe.source}: model={recipe.model.name} data={recipe.data.name} "
          f"reducer={names['reducer']} sync={names['sync']} order={names['order']} precision={recipe.precision()} "
          f"zero={recipe.zero_stage()}; world {world_size}: micro batch {micro} x accumulation {gas} "
          f"= global {recipe.train.global_batch_size}")
    print(model_line(recipe, count))
    return 0


def train_main(argv: Optional[List[str]] = None, prog: str = "python -m ds_ext.train") -> int:
    """The trainer's command line (``python -m ds_ext.train``, ``ds-ext train``): the exit code."""
    with console_logging():
        return _train(argv, prog)


def _train(argv: Optional[List[str]], prog: str) -> int:
    from .recipe import DataPathError, RecipeError, load_recipe, preflight, world_size_from

    args = build_parser(prog).parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides, args.host_config)
        near_miss_block(recipe.deepspeed, source=recipe.source, prefix="deepspeed.")
        world = world_size_from(args.world_size, os.environ)  # the launcher sets WORLD_SIZE per process
        if args.check:
            return check(recipe, world or 1)
        preflight(recipe, world)  # world-size rules, paths, data files: before any process group starts
    except DataPathError as e:
        print(f"data error:\n{e}", file=sys.stderr)
        return ExitCode.DATA
    except RecipeError as e:
        print(f"recipe error:\n{e}{missing_recipe_hint(args.recipe)}", file=sys.stderr)
        return ExitCode.RECIPE
    try:
        from . import loop

        return loop.train(recipe)
    finally:
        # tear the process group down before interpreter exit: leaving it to the c10d / gloo destructors
        # at exit has ended a finished run with "terminate called without an active exception" (exit 250)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---- schedule ------------------------------------------------------------------------------------

def _recipe_schedule(recipe, world: int, steps_per_epoch: Optional[int]):
    from ..registry import DATASETS, ORDERS, load_builtin
    from .optim import LRSchedule

    load_builtin()
    micro, gas = recipe.batch_plan(world)
    if steps_per_epoch is None:
        if recipe.train.steps_per_epoch:
            steps_per_epoch = recipe.train.steps_per_epoch
        else:
            bundle = DATASETS.build(recipe.data.name, recipe.data.options, root=recipe.data.root)
            order = ORDERS.build(recipe.method.order.name, recipe.method.order.options, len(bundle.train), 0, world,
                                 recipe.train.seed)
            steps_per_epoch = order.shard_size // micro // gas
    total = int(steps_per_epoch * recipe.train.epochs)
    lr = LRSchedule(None, recipe.schedule, recipe.optimizer.options.lr, steps_per_epoch, recipe.train.epochs)
    return lr, total, steps_per_epoch


def schedule_main(argv: Optional[Sequence[str]] = None, prog: str = "ds-ext schedule") -> int:
    """Print a recipe's synchronisation schedule without training (``ds-ext schedule``)."""
    from ..sync.schedules import make_period, simulate
    from .recipe import RecipeError, load_recipe

    ap = argparse.ArgumentParser(prog=prog, description="Print a recipe's synchronisation schedule without training.")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--host-config", default=None)
    ap.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE or 1")
    ap.add_argument("--steps-per-epoch", type=int, default=None,
                    help="default: train.steps_per_epoch, else computed from the data set")
    ap.add_argument("--csv", action="store_true", help="print every round: round,first_step,H,lr,data_parallel")
    args = ap.parse_args(argv)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        recipe = load_recipe(args.recipe, args.overrides, args.host_config)
    except RecipeError as e:
        print(f"recipe error:\n{e}{missing_recipe_hint(args.recipe)}", file=sys.stderr)
        return ExitCode.RECIPE
    sync = recipe.method.sync
    if sync.name not in ("local", "dssync"):
        print(f"{recipe.source}: method.sync is {sync.name!r}: parameters are not averaged on a period "
              f"(every step communicates through reducer {recipe.method.reducer.name!r})")
        return 0
    try:
        lr, total, spe = _recipe_schedule(recipe, world, args.steps_per_epoch)
    except (FileNotFoundError, RecipeError) as e:
        print(f"cannot size the schedule: {e}\n(pass --steps-per-epoch N)", file=sys.stderr)
        return ExitCode.RECIPE
    period = make_period(sync.options, lr.warmup, total)
    rounds = simulate(period, lr.lr_at, total)
    if args.csv:
        print("round,first_step,H,lr,data_parallel")
        for i, (s, h, dp) in enumerate(rounds):
            print(f"{i},{s},{h},{lr.lr_at(s):.6g},{int(dp)}")
        return 0
    syncs = len(rounds)
    print(f"{recipe.source}: sync={sync.name} period: {period.describe()}")
    print(f"world {world}: {spe} steps/epoch x {recipe.train.epochs} epochs = {total} optimizer steps; "
          f"{syncs} sync rounds; {syncs / max(total, 1):.2%} of steps communicate "
          f"(data-parallel: 100%)")
    print(f"{'progress':>9} {'step':>9} {'lr':>11} {'H':>7}")
    if not rounds:
        return 0
    print(f"{0:>8}% {0:>9} {lr.lr_at(0):>11.4g} {rounds[0][1]:>7}")  # the first round's H
    k = 0
    for pct in range(10, 101, 10):
        step = min(total - 1, math.ceil(total * pct / 100) - 1)
        while k + 1 < len(rounds) and rounds[k + 1][0] <= step:
            k += 1
        print(f"{pct:>8}% {step:>9} {lr.lr_at(step):>11.4g} {rounds[k][1]:>7}")
    return 0


# ---- ds-ext ----------------------------------------------------------------------------------------

def _check(argv: List[str]) -> int:
    return train_main(list(argv) + ["--check"], prog="ds-ext check")


def _recipes(argv: List[str]) -> int:
    from .recipe.bundled import main as recipes_main

    return recipes_main(argv)


def _methods(argv: List[str]) -> int:
    from ..methods import main as methods_main

    return methods_main(argv)


def _report(argv: List[str]) -> int:
    from ..report import main as report_main

    return report_main(argv)


def _compare(argv: List[str]) -> int:
    from .compare import main as compare_main

    return compare_main(argv)


def _costmodel(argv: List[str]) -> int:
    from ..costmodel.project import main as costmodel_main

    return costmodel_main(argv)


# subcommand: (what it does, how it runs)
SUBCOMMANDS: Dict[str, tuple] = {
    "train": ("train a recipe (as python -m ds_ext.train / deepspeed --module ds_ext.train)",
              lambda argv: train_main(argv, prog="ds-ext train")),
    "check": ("validate a recipe without training (= train --check)", _check),
    "recipes": ("list, show or copy the bundled recipes", _recipes),
    "methods": ("the method cards: list, show, options", _methods),
    "report": ("environment and kernel (op) report", _report),
    "schedule": ("print a recipe's synchronisation (Local SGD / QSR) schedule", schedule_main),
    "costmodel": ("the step-time cost model's projections", _costmodel),
    "compare": ("compare runs: loss against step and bytes, bytes by kind, step time (PNG) and a table", _compare),
}


def usage() -> str:
    w = max(map(len, SUBCOMMANDS))
    lines = ["usage: ds-ext <subcommand> [options]   (ds-ext <subcommand> --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<{w}}  {what}" for name, (what, _) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def exit_process(code: int) -> None:
    """Leave the process with ``code``. A finished run (summary written, wandb finished, process group
    destroyed) leaves without interpreter teardown: a C++ thread destroyed while joinable there has aborted a
    finished run ("terminate called without an active exception", SIGABRT) and turned its exit code non-zero."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        os._exit(0)
    sys.exit(int(code))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ds-ext <subcommand> ...``: the subcommand's exit code. Called without ``argv`` (the console script,
    ``python -m ds_ext.trainer.cli``) the process is the command: ``train`` then leaves through
    ``exit_process``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else ExitCode.RECIPE
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"ds-ext: unknown subcommand {name!r}\n{usage()}", file=sys.stderr)
        return ExitCode.RECIPE
    code = SUBCOMMANDS[name][1](rest)
    if argv is None and name == "train":
        exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
