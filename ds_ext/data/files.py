"""Locating data files under ``data.root`` with errors that say how to fix a missing file.

Every reader here reads local files only (nothing downloads). ``data.root`` comes from the recipe or, when
the recipe leaves it out, from ``data_root`` in the per-host file ``.config_<hostname>.yml``.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

#: what a reader's ``files(options)`` returns: (recipe key, path) pairs, each path relative to ``data.root``
#: unless absolute, each key the recipe setting that locates the file
FileList = List[Tuple[str, str]]


def _where() -> str:
    return (f"data.root in the recipe (or --set data.root=DIR), or data_root in the per-host file "
            f".config_{socket.gethostname()}.yml")


def data_root(root: Optional[str], dataset: str, layout: str, fix: str) -> Path:
    """``root`` as a Path; a clear FileNotFoundError when it is unset or not a directory."""
    if root is None:
        raise FileNotFoundError(
            f"{dataset}: no data directory configured; set {_where()}.\n"
            f"  expected layout: <root>/{layout}\n  to provide it: {fix}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{dataset}: data directory {path} does not exist (set by {_where()}).\n"
            f"  expected layout: {path}/{layout}\n  to provide it: {fix}")
    return path


def require(path: Path, dataset: str, root: Path, layout: str, fix: str) -> Path:
    """Return ``path`` if it is a file; otherwise raise FileNotFoundError naming it, the setting that
    controls its directory, the expected layout and how to put the data there."""
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"{dataset}: missing file {path}\n"
        f"  data root: {root} (set by {_where()})\n"
        f"  expected layout: {root}/{layout}\n"
        f"  to provide it: {fix}")


def needs_files(declare: Callable[[Any], FileList]):
    """Declares the files a reader opens first, as the reader's ``files(options)`` (a ``FileList``: keyed
    ``data.root``, or ``data.<option>`` for a path option given as an absolute path). The trainer's
    preflight reads it through the registry (``DATASETS.get(name).factory.files``) before the process group
    starts. Only a trigger: when one is missing, the preflight builds the data set, and the reader's own
    FileNotFoundError (path, layout, how to get the data) is what the user sees; when the reader finds its
    files after all, nothing is refused. A reader without a declaration checks its files when it is built."""
    def deco(reader):
        reader.files = declare
        return reader

    return deco


def under_root(*paths: str) -> Callable[[Any], FileList]:
    """A declaration of fixed files under ``data.root``."""
    return lambda options: [("data.root", p) for p in paths]


def option_file(options: Any, key: str) -> Tuple[str, str]:
    """The file a path option names: keyed ``data.<key>`` when it is absolute (``data.root`` is then not
    used), else ``data.root``."""
    value = getattr(options, key)
    return (f"data.{key}" if os.path.isabs(value) else "data.root", value)
