"""The trainer.

    deepspeed [--hostfile H | --num_gpus N] --module ds_ext.train --recipe recipes/X.yaml [--set k=v ...]
    python -m ds_ext.train --recipe recipes/X.yaml [--set k=v ...] --check [--world-size N]

``--check`` validates the recipe (overrides, per-host file, method combination, batch arithmetic
for ``--world-size``, default $WORLD_SIZE or 1) and exits 0, or 2 with one line per problem,
without starting training.

While it runs, the library's ``logging`` records are shown on the console by
``ds_ext.trainer.records.console_logging``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .exit_codes import ExitCode
from .records import console_logging


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ds_ext.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True, help="recipe YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set train.epochs=3 (repeatable)")
    ap.add_argument("--host-config", default=None,
                    help="per-host paths file (default: $DS_EXT_HOST_CONFIG or ./.config_<hostname>.yml)")
    ap.add_argument("--check", action="store_true", help="validate the recipe and exit (0 ok, 2 errors)")
    ap.add_argument("--world-size", type=int, default=None, help="world size assumed by --check")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def check(recipe, world_size: int) -> int:
    from .recipe import data_problems, path_problems

    micro, gas = recipe.check_world(world_size)
    # missing paths are warnings here (a recipe may be linted where its data is not mounted); a run refuses them
    for key, msg in path_problems(recipe) + data_problems(recipe):
        print(f"warning: {recipe.source}: {key}: {msg}", file=sys.stderr)
    names = recipe.method_names()
    print(f"ok: {recipe.source}: model={recipe.model.name} data={recipe.data.name} "
          f"reducer={names['reducer']} sync={names['sync']} order={names['order']} precision={recipe.precision()} "
          f"zero={recipe.zero_stage()}; world {world_size}: micro batch {micro} x accumulation {gas} "
          f"= global {recipe.train.global_batch_size}")
    return 0


def train_main(argv: Optional[List[str]] = None) -> int:
    with console_logging():
        return _main(argv)


def _main(argv: Optional[List[str]] = None) -> int:
    from .recipe import DataPathError, RecipeError, load_recipe, preflight, world_size_from

    args = build_parser().parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides, args.host_config)
        world = world_size_from(args.world_size, os.environ)  # the launcher sets WORLD_SIZE per process
        if args.check:
            return check(recipe, world or 1)
        preflight(recipe, world)  # world-size rules, paths, data files: before any process group starts
    except DataPathError as e:
        print(f"data error:\n{e}", file=sys.stderr)
        return ExitCode.DATA
    except RecipeError as e:
        print(f"recipe error:\n{e}", file=sys.stderr)
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
