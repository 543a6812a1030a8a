"""MovieLens-20M implicit feedback for NCF (He et al., WWW 2017), prepared as the ExDyna seed's NCF benchmark
(kljp/exdyna ``ncf/convert.py`` + ``ncf/dataloading.py``, i.e. the MLPerf NCF reference).

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/movielens.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from ..registry import DATASETS, Options
from .base import DataBundle
from .files import data_root, needs_files, require, under_root

LAYOUT = "ml-20m/ratings.csv"
FIX = ("download ml-20m.zip from https://grouplens.org/datasets/movielens/20m/ and unzip it into the data root: "
       "unzip ml-20m.zip -d <root>  (it creates <root>/ml-20m/ratings.csv); run/prepare-ml20m.sh <root> checks it")


def read_ratings(path: Path, max_rows: Optional[int] = None):
    """(user ids, item ids, timestamps) int64 arrays from a MovieLens ``ratings.csv``."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    if header[:2] != ["userId", "movieId"] or len(header) < 4:
        raise ValueError(f"{path}: expected the MovieLens header 'userId,movieId,rating,timestamp', got "
                         f"{','.join(header)!r}")
    ts_col = header.index("timestamp") if "timestamp" in header else 3
    a = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1, ts_col), dtype=np.int64, max_rows=max_rows,
                   ndmin=2)
    return a[:, 0], a[:, 1], a[:, 2]


def _factorize(a: np.ndarray) -> np.ndarray:
    """Codes 0.. in order of first appearance (pandas.factorize)."""
    _, first, inv = np.unique(a, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)]


def leave_one_out(users, items, ts, min_ratings: int):
    """The seed's preparation (module docstring, steps 1-3). Returns train (u, i), test (u, i) int64 arrays
    (test sorted by user, one row per user), the number of users and of items."""
    _, inv, cnt = np.unique(users, return_inverse=True, return_counts=True)
    keep = cnt[inv.reshape(-1)] >= min_ratings
    if not keep.any():
        raise ValueError(f"ml20m: no user has at least min_ratings={min_ratings} ratings")
    u, i, t = _factorize(users[keep]), _factorize(items[keep]), ts[keep]
    n_users, n_items = int(u.max()) + 1, int(i.max()) + 1
    order = np.argsort(t, kind="stable")
    u, i = u[order], i[order]
    _, first = np.unique(u * n_items + i, return_index=True)  # drop repeated pairs, keep the earliest
    first.sort()
    u, i = u[first], i[first]
    _, last_rev = np.unique(u[::-1], return_index=True)  # last interaction of each user (users sorted)
    test_idx = len(u) - 1 - last_rev
    is_test = np.zeros(len(u), dtype=bool)
    is_test[test_idx] = True
    tr = np.argsort(u[~is_test], kind="stable")  # training rows grouped by user, time order within a user
    return (u[~is_test][tr], i[~is_test][tr]), (u[test_idx], i[test_idx]), n_users, n_items


def sample_unrated(rated_keys: np.ndarray, users: np.ndarray, n_items: int, k: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``[len(users), k]`` items, distinct within a row, none rated by that row's user.
    ``rated_keys``: sorted ``user * n_items + item`` of all rated pairs."""
    rated_per_user = np.bincount(rated_keys // n_items, minlength=int(users.max()) + 1)[users]
    if (n_items - rated_per_user < k).any():
        worst = int(users[np.argmax(rated_per_user)])
        raise ValueError(f"ml20m: user {worst} rated {int(rated_per_user.max())} of {n_items} items; "
                         f"cannot draw test_negatives={k} distinct unrated items")
    cand = rng.integers(0, n_items, size=(len(users), k), dtype=np.int64)
    while True:
        keys = users[:, None] * n_items + cand
        pos = np.searchsorted(rated_keys, keys).clip(max=len(rated_keys) - 1)
        bad = rated_keys[pos] == keys
        srt = np.argsort(cand, axis=1, kind="stable")  # repeated items: every occurrence after the first
        cs = np.take_along_axis(cand, srt, axis=1)
        dup_sorted = np.zeros_like(bad)
        dup_sorted[:, 1:] = cs[:, 1:] == cs[:, :-1]
        dup = np.zeros_like(bad)
        np.put_along_axis(dup, srt, dup_sorted, axis=1)
        bad |= dup
        n_bad = int(bad.sum())
        if n_bad == 0:
            return cand
        cand[bad] = rng.integers(0, n_items, size=n_bad, dtype=np.int64)


class NCFTrain(Dataset):
    """Positives + per-epoch uniform negatives (module docstring); x = [user, item] int64, y = 0/1."""

    def __init__(self, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, negatives: int,
                 seed: int):
        self.users = users.astype(np.int32)
        self.items = items.astype(np.int32)
        self.num_users, self.num_items = num_users, num_items
        self.negatives, self.seed = negatives, seed
        self.P = len(users)
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the negatives for ``epoch`` (deterministic in (seed, epoch), identical on every rank)."""
        if epoch == self.epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        self.neg_items = rng.integers(0, self.num_items, size=self.P * self.negatives, dtype=np.int32)
        self.epoch = epoch

    def __len__(self) -> int:
        return self.P * (1 + self.negatives)

    def _rows(self, idx: np.ndarray):
        pos = idx < self.P
        k = idx[~pos] - self.P  # index into neg_items; its positive is k % P
        j = idx.copy()
        j[~pos] = k % self.P
        item = np.empty(len(idx), dtype=np.int32)
        item[pos] = self.items[idx[pos]]
        item[~pos] = self.neg_items[k]
        x = torch.from_numpy(np.stack([self.users[j], item], axis=-1).astype(np.int64))
        return x, torch.from_numpy(pos.astype(np.int64))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        x, y = self._rows(np.asarray([i]))
        return x[0], y[0]

    def __getitems__(self, indices):  # batched fetch used by torch's DataLoader
        x, y = self._rows(np.asarray(indices, dtype=np.int64))
        return list(zip(x.unbind(0), y.unbind(0)))


class NCFRanking(Dataset):
    """Per user ``k`` negatives then the held-out positive; example ``u*(k+1)+j`` is candidate ``j`` of user
    ``u`` with label 1 iff ``j == k``."""

    def __init__(self, users: np.ndarray, candidates: np.ndarray, num_users: int, num_items: int):
        self.users = users.astype(np.int64)
        self.candidates = candidates.astype(np.int64)  # [U, k+1], positive last
        self.num_users, self.num_items = num_users, num_items
        self.per_user = candidates.shape[1]

    def __len__(self) -> int:
        return len(self.users) * self.per_user

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        u, j = divmod(int(i), self.per_user)
        return torch.tensor([self.users[u], self.candidates[u, j]]), torch.tensor(int(j == self.per_user - 1))


class ML20MOptions(Options):
    min_ratings: int = Field(20, ge=1, description="drop users with fewer ratings (seed: 20)")
    negatives: int = Field(4, ge=0, description="training negatives per positive (seed: 4)")
    test_negatives: int = Field(100, ge=1, description="unrated items ranked against each test positive (seed: 100)")
    seed: int = Field(1, description="seeds the test negatives and, with the epoch, the training negatives (seed: 1)")
    max_rows: Optional[int] = Field(None, ge=1, description="read only the first N rows of ratings.csv (smoke runs)")


@DATASETS.register("ml20m", ML20MOptions)
@needs_files(under_root("ml-20m/ratings.csv"))
def ml20m(options: ML20MOptions, root: Optional[str] = None, **_) -> DataBundle:
    """MovieLens-20M leave-one-out implicit feedback for NCF: x = [user, item] int64, y = click 0/1."""
    base = data_root(root, "ml20m", LAYOUT, FIX)
    path = require(base / "ml-20m" / "ratings.csv", "ml20m", base, LAYOUT, FIX)
    (tu, ti), (vu, vi), n_users, n_items = leave_one_out(*read_ratings(path, options.max_rows), options.min_ratings)
    rated = np.unique(np.concatenate([tu * n_items + ti, vu * n_items + vi]))
    negs = sample_unrated(rated, vu, n_items, options.test_negatives, np.random.default_rng(options.seed))
    val = NCFRanking(vu, np.concatenate([negs, vi[:, None]], axis=1), n_users, n_items)
    train = NCFTrain(tu, ti, n_users, n_items, options.negatives, options.seed)
    return DataBundle(train, val, (2,), 2)


@torch.no_grad()
def ranking_metrics(model: torch.nn.Module, val: NCFRanking, k: int = 10, users_per_batch: int = 4096) -> Dict:
    """HR@k and NDCG@k of the held-out positive among its candidates (the NCF paper's metrics).
    Rank = number of negatives scored strictly higher than the positive."""
    from ..models.recsys import binary_logit

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    hits, ndcg, n = 0.0, 0.0, len(val.users)
    for a in range(0, n, users_per_batch):
        u = torch.from_numpy(val.users[a:a + users_per_batch])
        c = torch.from_numpy(val.candidates[a:a + users_per_batch])
        x = torch.stack([u[:, None].expand_as(c), c], dim=-1).reshape(-1, 2).to(dev)
        z = binary_logit(model(x).float()).view(c.shape)
        rank = (z[:, :-1] > z[:, -1:]).sum(1)
        hit = rank < k
        hits += hit.sum().item()
        ndcg += (hit.double() / torch.log2(rank.double() + 2)).sum().item()
    model.train(was_training)
    return {"hr": hits / max(n, 1), "ndcg": ndcg / max(n, 1)}
