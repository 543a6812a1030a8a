"""Typed recipe schema: YAML file + ``--set a.b=value`` overrides + a per-host paths file.

A recipe has the sections ``model``, ``data``, ``optimizer``, ``schedule``, ``train``, ``method``
(``reducer`` / ``sync`` / ``order`` blocks), ``deepspeed`` (passed through to DeepSpeed), ``log`` and
``checkpoint``; docs/guide/recipes.md documents every key. Machine-specific paths (``data_root``, ``log_root``)
live in a per-host file ``.config_<hostname>.yml`` (as the QSR reference code's ``--config-pth``), so one recipe
runs on any cluster.

Every problem is reported before training as ``RecipeError`` naming the file, the dotted key and
what is allowed; ``python -m ds_ext.train --recipe R --check`` prints them and exits 2. Loading checks
what needs no world size and no file system; ``Recipe.check_world`` adds the world-size rules (batch
split, and what the methods' own ``check(view)`` finds once the world size is known: dssync groups,
exdyna blocks) and ``preflight`` the environment (``DS_EXT_OPS``), the paths and data files, both run by
the trainer before ``init_distributed`` (the world size from ``--world-size`` or the launcher's ``$WORLD_SIZE``).
Every YAML text read (recipe, ``--set`` value, per-host file) is measured before use: one that expands to
more than ``YAML_MAX_VALUES`` values through aliases (a "billion laughs") is refused unexpanded.
Deliberate limits: in the ``deepspeed`` section only the keys ds_ext reads are type-checked (DeepSpeed
validates the rest when the engine is built); the data-file check knows only the files each reader
declares (``files(options)``, see ds_ext/data/files.py) and lets the reader itself produce the message.

Modules: ``schema`` (the sections), ``load`` (YAML, ``--set``, the per-host file, the alias-bomb limits),
``ds_config`` (an existing DeepSpeed config), ``preflight`` (checks before the process group starts),
``bundled`` (the recipes shipped with the package). The method-block schema they share with ``attach()``
is ``ds_ext/spec.py``.
"""
from ...spec import RecipeError
from .schema import (
    COLLECTIVE_TIMEOUT_MAX_S, COLLECTIVE_TIMEOUT_MIN_S, LR_MAX, SEED_MAX, CheckpointSection, DataSection, HostConfig,
    LogSection, ModelSection, OptimizerSection, Recipe, ScheduleSection, TrainSection, WandbSection, check_combination,
    method_problems)
from .ds_config import ds_config_problems
from .load import (
    YAML_MAX_CHARS, YAML_MAX_VALUES, apply_overrides, find_host_config, load_host_config, load_recipe,
    parse_overrides, recipe_from_dict)
from .preflight import (
    DataPathError, data_problems, environment_problems, host_memory, model_line, model_problems, parameter_count,
    path_problems, preflight, world_size_from)

__all__ = [
    "RecipeError", "DataPathError", "Recipe", "HostConfig", "ModelSection", "DataSection", "OptimizerSection",
    "ScheduleSection", "TrainSection", "WandbSection", "LogSection", "CheckpointSection", "SEED_MAX",
    "COLLECTIVE_TIMEOUT_MAX_S", "COLLECTIVE_TIMEOUT_MIN_S", "LR_MAX", "YAML_MAX_VALUES", "YAML_MAX_CHARS",
    "load_recipe", "recipe_from_dict",
    "parse_overrides", "apply_overrides", "find_host_config", "load_host_config", "ds_config_problems",
    "method_problems", "check_combination", "preflight", "world_size_from", "path_problems", "data_problems",
    "environment_problems", "parameter_count", "host_memory", "model_line", "model_problems",
]
