"""Criteo Display Advertising Challenge (Kaggle 2014) click logs for DeepFM, prepared as the DS-Sync seed's
RecSys benchmark (neurips10899/divide-and-shuffle ``RecSys/code/utils.py: CriteoDataset``, itself the
pytorch-fm preprocessing after the competition winners' log-binning).

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/criteo.md``.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..registry import DATASETS, Options
from .base import DataBundle
from .files import data_root, needs_files, option_file, require

log = logging.getLogger(__name__)

NUM_INT, NUM_CAT = 13, 26
NUM_FIELDS = NUM_INT + NUM_CAT
_NULL = np.iinfo(np.int64).min  # token of an empty integer field
_FORMAT = 1  # bump when the cached arrays' meaning changes

FIX = ("get dac.tar.gz (Criteo Display Advertising Challenge) and unpack it: mkdir -p <root>/criteo && "
       "tar xzf dac.tar.gz -C <root>/criteo  (only train.txt is read; or point data.options.file elsewhere)")


_P = np.uint64(1_000_003)  # multiplier of the 64-bit polynomial string hash


def _field_bounds(b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Start and end byte offsets ``[n, 40]`` of the fields of every well-formed line of ``b`` (a block of
    whole lines ending in a newline). Lines without exactly 40 tab-separated fields are dropped."""
    sep = np.flatnonzero((b == 9) | (b == 10))
    starts = np.empty_like(sep)
    starts[0] = 0
    starts[1:] = sep[:-1] + 1
    line_end = np.flatnonzero(b[sep] == 10)  # index in sep of each line's newline
    per_line = np.diff(line_end, prepend=-1)
    good = per_line == NUM_FIELDS + 1
    if not good.all():
        keep = np.repeat(good, per_line)
        sep, starts = sep[keep], starts[keep]
    return starts.reshape(-1, NUM_FIELDS + 1), sep.reshape(-1, NUM_FIELDS + 1)


def _window(b: np.ndarray, s: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` bytes starting at every offset in ``s`` (zeros past the end): shape ``s.shape + (width,)``."""
    padded = np.concatenate([b, np.zeros(width, np.uint8)])
    return np.lib.stride_tricks.sliding_window_view(padded, width)[s]


def _parse_ints(b: np.ndarray, s: np.ndarray, e: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Decimal integers (optional leading '-') in the byte spans [s, e): (values int64, empty mask)."""
    length = e - s
    width = int(length.max(initial=0))
    if width > 18:
        raise ValueError(f"criteo: {what} field longer than 18 characters; is this the Criteo train.txt format?")
    val = np.zeros(s.shape, np.int64)
    if width == 0:
        return val, length == 0
    win = _window(b, s, width)
    j = np.arange(width)
    neg = (length > 0) & (win[..., 0] == ord("-"))
    inside = (j < length[..., None]) & ~((j == 0) & neg[..., None])
    d = win.astype(np.int16) - ord("0")
    if ((d < 0) | (d > 9))[inside].any():
        raise ValueError(f"criteo: non-numeric {what} field; each line must be label, 13 integer fields, "
                         f"26 categorical fields, tab-separated")
    for k in range(width):
        val = np.where(inside[..., k], val * 10 + d[..., k], val)
    return np.where(neg, -val, val), length == 0


def _hash_spans(b: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Token of the bytes in every span [s, e): the bytes themselves as a little-endian integer when at most
    8 long (exact: text has no NUL bytes), else a 64-bit polynomial hash over 8-byte words. Empty -> 0."""
    length = e - s
    words = -(-int(length.max(initial=0)) // 8)
    if words == 0:
        return np.zeros(s.shape, np.int64)
    win = _window(b, s, 8 * words)
    win = np.where(np.arange(8 * words) < length[..., None], win, np.uint8(0))  # contiguous copy
    w = win.view("<u8")  # [..., words]
    h = w[..., 0].copy()
    with np.errstate(over="ignore"):
        for k in range(1, words):
            h = h * _P + w[..., k]  # wraps mod 2^64, as intended
    return h.view(np.int64)


def parse_block(buf: bytes) -> Tuple[np.ndarray, np.ndarray]:
    """Whole lines of Criteo text -> (labels uint8 [n], tokens int64 [n, 39]) before frequency indexing,
    vectorised over bytes (no per-line Python objects)."""
    b = np.frombuffer(buf, np.uint8)
    if b.size and b[-1] != 10:
        b = np.append(b, np.uint8(10))
    if (b == 13).any():  # CRLF files
        b = b[b != 13]
    if b.size == 0:
        return np.zeros(0, np.uint8), np.zeros((0, NUM_FIELDS), np.int64)
    s, e = _field_bounds(b)
    labels, empty_label = _parse_ints(b, s[:, 0], e[:, 0], "label")
    if (empty_label | (labels < 0) | (labels > 1)).any():
        raise ValueError("criteo: the first field (label) must be 0 or 1")
    v, empty = _parse_ints(b, s[:, 1:1 + NUM_INT], e[:, 1:1 + NUM_INT], "integer")
    big = v > 2
    binned = np.floor(np.log(np.where(big, v, 3).astype(np.float64)) ** 2).astype(np.int64)
    tok_int = np.where(empty, _NULL, np.where(big, binned, v - 2))
    tok_cat = _hash_spans(b, s[:, 1 + NUM_INT:], e[:, 1 + NUM_INT:])
    return labels.astype(np.uint8), np.concatenate([tok_int, tok_cat], axis=1)


def _chunks(path: Path, chunk_rows: int, max_rows: Optional[int]):
    with open(path, "rb") as f:
        lines = f if max_rows is None else itertools.islice(f, max_rows)
        while True:
            block = list(itertools.islice(lines, chunk_rows))
            if not block:
                return
            yield parse_block(b"".join(block))


def _merge_counts(vals: np.ndarray, cnts: np.ndarray, new: np.ndarray):
    v, c = np.unique(new, return_counts=True)
    if len(vals) == 0:
        return v, c
    allv, inv = np.unique(np.concatenate([vals, v]), return_inverse=True)
    return allv, np.bincount(inv.reshape(-1), weights=np.concatenate([cnts, c])).astype(np.int64)


def preprocess(path: Path, min_count: int, max_rows: Optional[int], chunk_rows: int, out=None):
    """Two passes over ``path``: token counts, then per-field indices. Returns (features uint32 [N, 39],
    labels uint8 [N], field_dims). ``out(n)`` may allocate the output arrays (memory-mapped files)."""
    vals = [np.zeros(0, np.int64) for _ in range(NUM_FIELDS)]
    cnts = [np.zeros(0, np.int64) for _ in range(NUM_FIELDS)]
    n, first, n_chunks = 0, None, 0
    for labels, tok in _chunks(path, chunk_rows, max_rows):
        for f in range(NUM_FIELDS):
            vals[f], cnts[f] = _merge_counts(vals[f], cnts[f], tok[:, f])
        n += len(labels)
        n_chunks += 1
        if n_chunks == 1:
            first = (labels, tok)
    if n == 0:
        raise ValueError(f"criteo: {path} has no line with 40 tab-separated fields (label, 13 integer, "
                         f"26 categorical)")
    kept = [v[c >= min_count] for v, c in zip(vals, cnts)]
    field_dims = [len(k) + 1 for k in kept]
    feats, labs = out(n) if out is not None else (np.empty((n, NUM_FIELDS), np.uint32), np.empty(n, np.uint8))
    chunks = [first] if n_chunks == 1 else _chunks(path, chunk_rows, max_rows)
    a = 0
    for labels, tok in chunks:
        b = a + len(labels)
        for f in range(NUM_FIELDS):
            k = kept[f]
            pos = np.searchsorted(k, tok[:, f])
            hit = pos < len(k)
            hit[hit] = k[pos[hit]] == tok[hit, f]
            feats[a:b, f] = np.where(hit, pos, len(k))
        labs[a:b] = labels
        a = b
    return feats, labs, field_dims


def _cached(path: Path, cache_dir: Path, min_count: int, max_rows: Optional[int], chunk_rows: int):
    st = path.stat()
    key = hashlib.sha1(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, min_count, max_rows,
                                   _FORMAT]).encode()).hexdigest()[:16]
    stem = cache_dir / f"criteo-{key}"
    meta_path = stem.with_suffix(".json")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per host; the others wait, then read
        if not meta_path.is_file():
            tmp = f".tmp{os.getpid()}"
            fp, lp = Path(f"{stem}.features.npy{tmp}"), Path(f"{stem}.labels.npy{tmp}")

            def out(n):
                return (np.lib.format.open_memmap(fp, "w+", np.uint32, (n, NUM_FIELDS)),
                        np.lib.format.open_memmap(lp, "w+", np.uint8, (n,)))

            feats, labs, dims = preprocess(path, min_count, max_rows, chunk_rows, out)
            feats.flush()
            labs.flush()
            del feats, labs
            os.replace(fp, f"{stem}.features.npy")
            os.replace(lp, f"{stem}.labels.npy")
            meta_tmp = Path(f"{meta_path}{tmp}")
            meta_tmp.write_text(json.dumps({"source": str(path), "field_dims": dims, "min_count": min_count,
                                            "max_rows": max_rows}))
            os.replace(meta_tmp, meta_path)
    meta = json.loads(meta_path.read_text())
    return (np.load(f"{stem}.features.npy", mmap_mode="r"), np.load(f"{stem}.labels.npy", mmap_mode="r"),
            meta["field_dims"])


class CriteoRows(Dataset):
    """Rows ``rows`` of the indexed arrays: x = int64 [39] field indices, y = click label 0/1."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, rows: np.ndarray, field_dims: List[int]):
        self.features, self.labels, self.rows = features, labels, rows
        self.field_dims = list(field_dims)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        return torch.from_numpy(self.features[r].astype(np.int64)), torch.tensor(int(self.labels[r]))

    def __getitems__(self, indices):  # batched fetch used by torch's DataLoader
        r = self.rows[np.asarray(indices, dtype=np.int64)]
        x = torch.from_numpy(self.features[r].astype(np.int64))
        y = torch.from_numpy(self.labels[r].astype(np.int64))
        return list(zip(x.unbind(0), y.unbind(0)))


class CriteoOptions(Options):
    file: str = Field("criteo/train.txt", description="labelled Criteo file, relative to data.root (or absolute)")
    max_rows: Optional[int] = Field(None, ge=1, description="read only the first N lines (small runs)")
    min_count: int = Field(10, ge=1, description="a token needs this many occurrences to get its own index "
                                                 "(seed: min_threshold 10)")
    train_fraction: float = Field(0.9, gt=0, lt=1, description="share of rows used for training (seed: 0.9)")
    split_seed: int = Field(42, description="seed of the random train/validation split (seed: 42)")
    cache: bool = Field(True, description="keep the indexed arrays as .npy files and memory-map them")
    cache_dir: Optional[str] = Field(None, description="where the cache goes; default <dir of file>/ds_ext_cache")
    chunk_rows: int = Field(250_000, ge=1, description="lines parsed per chunk (peak memory roughly 1 GB per 250k)")


@DATASETS.register("criteo", CriteoOptions)
@needs_files(lambda o: [option_file(o, "file")])
def criteo(options: CriteoOptions, root: Optional[str] = None, **_) -> DataBundle:
    """Criteo display-ads clicks for DeepFM: x = 39 field indices (int64), y = click; 90/10 seeded split."""
    o = options
    layout = f"{o.file}   (label \\t 13 integer \\t 26 categorical fields per line)"
    if os.path.isabs(o.file):
        path = Path(o.file)
        if not path.is_file():
            raise FileNotFoundError(f"criteo: missing file {path} (data.options.file is absolute, so data.root "
                                    f"is not used)\n  to provide it: {FIX}")
    else:
        base = data_root(root, "criteo", layout, FIX)
        path = require(base / o.file, "criteo", base, layout, FIX)
    feats = None
    if o.cache:
        cache_dir = Path(o.cache_dir).expanduser() if o.cache_dir else path.parent / "ds_ext_cache"
        try:
            feats, labels, dims = _cached(path, cache_dir, o.min_count, o.max_rows, o.chunk_rows)
        except OSError as e:
            log.warning("criteo: cannot use cache directory %s (%s); indexing in memory instead", cache_dir, e)
    if feats is None:
        feats, labels, dims = preprocess(path, o.min_count, o.max_rows, o.chunk_rows)
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(o.split_seed)).numpy()
    if n < 2 ** 31:
        perm = perm.astype(np.int32)
    n_train = int(o.train_fraction * n)
    if n_train == 0 or n_train == n:
        raise ValueError(f"criteo: {n} rows cannot be split {o.train_fraction:g}/{1 - o.train_fraction:g}")
    log.info("criteo: %d rows from %s (%d train); field_dims=%s", n, path, n_train, dims)
    return DataBundle(CriteoRows(feats, labels, perm[:n_train], dims), CriteoRows(feats, labels, perm[n_train:], dims),
                      (NUM_FIELDS,), 2)
