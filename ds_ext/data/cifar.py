"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official "python version" archives, no torchvision.

On-disk layout under ``data.root`` (what the official archives unpack to)::

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch    (cifar-10-python.tar.gz)
    <root>/cifar-100-python/train, test                                     (cifar-100-python.tar.gz)

Get them from https://www.cs.toronto.edu/~kriz/cifar.html on a machine with internet and unpack with
``tar xzf cifar-10-python.tar.gz -C <root>`` (same for CIFAR-100). Each file is a pickled dict with
``data`` (uint8, N x 3072, channel-major 3x32x32) and ``labels`` (CIFAR-10) or ``fine_labels`` /
``coarse_labels`` (CIFAR-100).

Training transform (the one used by the DS-Sync and ExDyna seeds, written in torch): random 32x32 crop of
the image zero-padded by 4 pixels, random horizontal flip (p = 0.5), then per-channel normalisation. The
validation split is the official test set, normalised only. Images stay uint8 in memory (150 MB for
CIFAR-10 train); random numbers come from torch's global generator, which the trainer seeds per rank
(DataLoader workers get their own seeded streams).

Normalisation defaults are the true per-channel statistics of each training set (CIFAR-10 mean 0.4914,
0.4822, 0.4465, std 0.2470, 0.2435, 0.2616; CIFAR-100 mean 0.5071, 0.4865, 0.4409, std 0.2673, 0.2564,
0.2762), which DS-Sync also uses (rounded). ExDyna's CIFAR-10 code uses std 0.2023, 0.1994, 0.2010 (a widely
copied value); set ``std`` to reproduce it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Literal, Optional, Tuple

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.utils.data import Dataset

from ..registry import DATASETS, Options
from .base import DataBundle
from .files import data_root, needs_files, require, under_root


class CIFARImages(Dataset):
    """uint8 images ``[N, 3, 32, 32]`` + int64 labels; returns normalised float ``[3, 32, 32]`` and a label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: bool, pad: int = 4):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment, self.pad = augment, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i].float().div_(255.0)
        if self.augment:
            p = self.pad
            h, w = img.shape[-2:]
            padded = torch.nn.functional.pad(img, (p, p, p, p))  # zeros, like RandomCrop(padding=4)
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            img = padded[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        return (img - self.mean) / self.std, self.labels[i]


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _load(files: List[Path], label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{f}: not a CIFAR python batch (keys {sorted(d)}; need 'data' and {label_key!r})")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


class _CIFAROptions(Options):
    augment: bool = Field(True, description="random crop (pad 4) + horizontal flip on the training split")
    max_train: Optional[int] = Field(None, ge=1, description="use only the first N training images (smoke runs)")
    max_val: Optional[int] = Field(None, ge=1, description="use only the first N test images (smoke runs)")

    @field_validator("mean", "std", check_fields=False)
    @classmethod
    def _three(cls, v):
        if len(v) != 3:
            raise ValueError("needs one value per RGB channel (3 values)")
        return v


class CIFAR10Options(_CIFAROptions):
    mean: List[float] = Field(default_factory=lambda: [0.4914, 0.4822, 0.4465], description="per-channel mean")
    std: List[float] = Field(default_factory=lambda: [0.2470, 0.2435, 0.2616],
                             description="per-channel std (ExDyna's code: 0.2023, 0.1994, 0.2010)")


class CIFAR100Options(_CIFAROptions):
    mean: List[float] = Field(default_factory=lambda: [0.5071, 0.4865, 0.4409], description="per-channel mean")
    std: List[float] = Field(default_factory=lambda: [0.2673, 0.2564, 0.2762], description="per-channel std")
    labels: Literal["fine", "coarse"] = Field("fine", description="100 fine classes or 20 coarse superclasses")


_C10_FIX = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
            "into the data root: tar xzf cifar-10-python.tar.gz -C <root>")
_C100_FIX = ("download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
             "into the data root: tar xzf cifar-100-python.tar.gz -C <root>")


def _bundle(name, root, sub, train_files, test_files, label_key, num_classes, options, layout, fix) -> DataBundle:
    base = data_root(root, name, layout, fix)
    paths = [require(base / sub / f, name, base, layout, fix) for f in train_files + test_files]
    xtr, ytr = _load(paths[:len(train_files)], label_key)
    xva, yva = _load(paths[len(train_files):], label_key)
    if options.max_train:
        xtr, ytr = xtr[:options.max_train], ytr[:options.max_train]
    if options.max_val:
        xva, yva = xva[:options.max_val], yva[:options.max_val]
    o = options
    return DataBundle(CIFARImages(xtr, ytr, o.mean, o.std, o.augment), CIFARImages(xva, yva, o.mean, o.std, False),
                      (3, 32, 32), num_classes)


_C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@DATASETS.register("cifar10", CIFAR10Options)
@needs_files(under_root(*(f"cifar-10-batches-py/{n}" for n in _C10_TRAIN + ["test_batch"])))
def cifar10(options: CIFAR10Options, root: Optional[str] = None, **_) -> DataBundle:
    """CIFAR-10 from <root>/cifar-10-batches-py (50k train with crop+flip, 10k test as validation)."""
    return _bundle("cifar10", root, "cifar-10-batches-py", _C10_TRAIN, ["test_batch"], "labels", 10, options,
                   "cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}", _C10_FIX)


@DATASETS.register("cifar100", CIFAR100Options)
@needs_files(under_root("cifar-100-python/train", "cifar-100-python/test"))
def cifar100(options: CIFAR100Options, root: Optional[str] = None, **_) -> DataBundle:
    """CIFAR-100 from <root>/cifar-100-python (50k train with crop+flip, 10k test as validation)."""
    key, n = ("fine_labels", 100) if options.labels == "fine" else ("coarse_labels", 20)
    return _bundle("cifar100", root, "cifar-100-python", ["train"], ["test"], key, n, options,
                   "cifar-100-python/{train, test}", _C100_FIX)
