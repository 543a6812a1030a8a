"""``pytext``: byte-level language modelling over the Python standard library's own source files.

Real text nobody here wrote, present on every machine with Python and no download: the ``*.py`` files under the
running interpreter's ``sysconfig.get_paths()["stdlib"]`` (or ``data.source``), skipping directories named in
``exclude`` (default: ``site-packages``, ``test``, ``tests``, ``idle_test``, ``__pycache__``: installed packages and
the test suites, whose generated data files are not representative text). CPython 3.11's stdlib gives 734 files,
12.1 MB with the default exclusions (measured on this machine).

Split: by file, never inside one. A file goes to validation when the first 8 bytes of ``sha256(relative path)``
(POSIX spelling), read as an unsigned integer, are below ``val_fraction * 2**64``; so the split depends on the paths
only and is the same on every rank and every machine (the same Python version gives the same files). Each split is
the concatenation of its files in sorted path order, each followed by one ``\\n``.

Examples (as ``ds_ext.data.wikitext``): windows of ``bptt`` bytes ``x`` with next-byte targets ``y`` (int64
``[bptt]``, vocabulary 256); the model returns ``[B, 256, T]`` logits, so the trainer's ``cross_entropy`` is the
mean loss per byte in nats (bits per byte = loss / ln 2). ``max_train_windows`` / ``max_val_windows`` keep an evenly
spaced subset of the windows (every one of the stream's windows is a candidate; the subset is fixed), which sets
what one epoch is and what an evaluation costs.

Cache: built once per (Python version, source tree, exclusions, split) under ``cache_dir`` (default
``~/.cache/ds_ext/pytext``): ``<key>.pt`` (the two byte streams) next to ``<key>.json``, the manifest (Python
version, source directory, every file's relative path, size, split and sha256, each split's byte count and the
sha256 of its concatenation). A later build reads the cache after checking the tree against the manifest: the same
files with the same sizes (and, where a file's modification time moved, the same sha256). A source directory that
is missing, or a tree that differs from the manifest, raises ``PyTextSourceError`` naming the directory and the
first difference; nothing is rebuilt silently with other data (delete the two cache files to rebuild from the tree
as it is now). The reader logs (``ds_ext.data``, INFO: the trainer prints it on rank 0) how many files and bytes
each split holds, the Python version and the cache file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..registry import DATASETS, Options
from .base import DataBundle

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the cache's layout or the split rule changes


class PyTextSourceError(FileNotFoundError):
    """The source tree is missing or no longer what the cache was built from."""


class ByteWindows(Dataset):
    """Next-byte windows over one uint8 stream; ``count`` (None: all) evenly spaced windows of the stream's."""

    vocab_size = 256

    def __init__(self, stream: torch.Tensor, bptt: int, count: Optional[int] = None):
        self.stream, self.bptt = stream, bptt
        total = (len(stream) - 1) // bptt
        n = total if count is None else min(count, total)
        self.starts = [(i * total // n) * bptt for i in range(n)] if n else []

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        a = self.starts[i]
        w = self.stream[a:a + self.bptt + 1].long()
        return w[:-1], w[1:]


class PyTextOptions(Options):
    source: Optional[str] = Field(None, description="directory of .py files (default: the running Python's stdlib, "
                                                    "sysconfig.get_paths()['stdlib'])")
    exclude: List[str] = Field(default_factory=lambda: ["site-packages", "test", "tests", "idle_test", "__pycache__"],
                               description="directory names skipped anywhere in the tree")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of files (by path hash) in validation")
    bptt: int = Field(128, ge=1, description="bytes per example window")
    max_train_windows: Optional[int] = Field(None, ge=1, description="evenly spaced subset of training windows")
    max_val_windows: Optional[int] = Field(None, ge=1, description="evenly spaced subset of validation windows")
    cache_dir: Optional[str] = Field(None, description="where the cache goes (default ~/.cache/ds_ext/pytext)")


def python_version() -> str:
    return platform.python_version()


def is_val(rel: str, fraction: float) -> bool:
    """The split rule: the path's sha256 prefix below ``fraction`` of 2**64."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return h < int(fraction * 2 ** 64)


def scan(source: Path, exclude: List[str]) -> List[Tuple[str, Path]]:
    """(relative POSIX path, path) of every ``*.py`` file under ``source``, sorted, skipping ``exclude`` dirs."""
    skip = set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath, f)
                out.append((p.relative_to(source).as_posix(), p))
    return sorted(out)


def _source(options: PyTextOptions) -> Path:
    src = Path(options.source).expanduser() if options.source else Path(sysconfig.get_paths()["stdlib"])
    if not src.is_dir():
        raise PyTextSourceError(f"pytext: source directory {src} does not exist (data.source, default: this Python's "
                                f"stdlib); the data set reads the *.py files there")
    return src


def _cache_paths(options: PyTextOptions, src: Path) -> Tuple[Path, Path]:
    base = Path(options.cache_dir).expanduser() if options.cache_dir else Path.home() / ".cache" / "ds_ext" / "pytext"
    what = json.dumps([FORMAT, python_version(), str(src.resolve()), sorted(options.exclude), options.val_fraction])
    key = f"py{python_version()}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"
    return base / f"{key}.pt", base / f"{key}.json"


def _build(src: Path, options: PyTextOptions) -> Tuple[Dict[str, torch.Tensor], dict]:
    files = scan(src, options.exclude)
    if not files:
        raise PyTextSourceError(f"pytext: no *.py files under {src} (exclude: {options.exclude})")
    parts: Dict[str, List[bytes]] = {"train": [], "val": []}
    rows = []
    for rel, p in files:
        raw = p.read_bytes()
        split = "val" if is_val(rel, options.val_fraction) else "train"
        parts[split].append(raw + b"\n")
        rows.append({"path": rel, "size": len(raw), "split": split, "sha256": hashlib.sha256(raw).hexdigest(),
                     "mtime_ns": p.stat().st_mtime_ns})
    streams, manifest = {}, {"format": FORMAT, "python": python_version(), "source": str(src), "files": rows,
                             "exclude": sorted(options.exclude), "val_fraction": options.val_fraction}
    for split, chunks in parts.items():
        data = b"".join(chunks)
        if len(data) < 2:
            raise PyTextSourceError(f"pytext: the {split} split of {src} is empty (val_fraction "
                                    f"{options.val_fraction}, {len(files)} files)")
        streams[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        manifest[split] = {"files": len(chunks), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return streams, manifest


def _write(path: Path, write) -> None:
    """Atomically (ranks build the same bytes at once: each renames its own temporary file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def check_tree(src: Path, manifest: dict, options: PyTextOptions, cache: Path) -> None:
    """Raise ``PyTextSourceError`` naming ``src`` and the first difference when the tree is not the manifest's."""
    fix = f"delete {cache} and {cache.with_suffix('.json')} to rebuild the cache from the tree as it is now"
    now = dict(scan(src, options.exclude))
    had = {r["path"]: r for r in manifest["files"]}
    gone, new = sorted(set(had) - set(now)), sorted(set(now) - set(had))
    if gone or new:
        what = f"{len(gone)} file(s) gone (first: {gone[0]})" if gone else f"{len(new)} new file(s) (first: {new[0]})"
        raise PyTextSourceError(f"pytext: the source tree {src} changed since the cache was built: {what}; {fix}")
    for rel, p in now.items():
        st, row = p.stat(), had[rel]
        if st.st_size != row["size"] or (st.st_mtime_ns != row["mtime_ns"]
                                         and hashlib.sha256(p.read_bytes()).hexdigest() != row["sha256"]):
            raise PyTextSourceError(f"pytext: the source tree {src} changed since the cache was built: {p} differs; "
                                    f"{fix}")


def load(options: PyTextOptions) -> Tuple[Dict[str, torch.Tensor], dict, Path]:
    """The two byte streams, the manifest and the cache file: read from the cache (tree checked) or built."""
    src = _source(options)
    cache, mpath = _cache_paths(options, src)
    if cache.is_file() and mpath.is_file():
        manifest = json.loads(mpath.read_text())
        check_tree(src, manifest, options, cache)
        streams = torch.load(cache, weights_only=True)
        for split in ("train", "val"):
            digest = hashlib.sha256(streams[split].numpy().tobytes()).hexdigest()
            if digest != manifest[split]["sha256"]:
                raise PyTextSourceError(f"pytext: the cache {cache} does not match its manifest ({split} split); "
                                        f"delete it and {mpath} to rebuild")
        manifest["cache"] = "reused"
        return streams, manifest, cache
    streams, manifest = _build(src, options)
    _write(cache, lambda t: torch.save(streams, t))
    _write(mpath, lambda t: t.write_text(json.dumps(manifest, indent=1)))
    manifest["cache"] = "built"
    return streams, manifest, cache


@DATASETS.register("pytext", PyTextOptions)
def pytext(options: PyTextOptions, **_) -> DataBundle:
    """Byte-level LM over the Python stdlib's *.py files, split by path hash: [bptt] bytes -> next bytes."""
    streams, m, cache = load(options)
    train = ByteWindows(streams["train"], options.bptt, options.max_train_windows)
    val = ByteWindows(streams["val"], options.bptt, options.max_val_windows)
    for name, ds in (("train", train), ("val", val)):
        if len(ds) == 0:
            raise ValueError(f"pytext: the {name} split has {len(streams[name])} bytes, too few for one window of "
                             f"bptt={options.bptt} (+1 target)")
    log.info("pytext: Python %s, %s: train %d files %d bytes (%d windows), val %d files %d bytes (%d windows); "
             "cache %s (%s)", m["python"], m["source"], m["train"]["files"], m["train"]["bytes"], len(train),
             m["val"]["files"], m["val"]["bytes"], len(val), cache, m["cache"])
    bundle = DataBundle(train, val, (options.bptt,), 256)
    bundle.manifest = {k: v for k, v in m.items() if k != "files"}  # what a run records (Python version, sizes)
    return bundle
