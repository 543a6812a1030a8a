"""Locating data files under ``data.root`` with errors that say how to fix a missing file.

Every reader here reads local files only (nothing downloads). ``data.root`` comes from the recipe or, when
the recipe leaves it out, from ``data_root`` in the per-host file ``.config_<hostname>.yml``.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional


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
