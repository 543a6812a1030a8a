"""scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes): real data that
ships inside the scikit-learn wheel, so the default recipe needs no download."""
from __future__ import annotations

from typing import Annotated, List

import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from ..registry import DATASETS, Options
from .base import DataBundle


class DigitsOptions(Options):
    val_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = Field(0, description="seed of the fixed train/val split")


def digits_arrays():
    """``(images, target)`` of scikit-learn's digits, as ``sklearn.datasets.load_digits`` returns them: read from the
    ``digits.csv.gz`` inside the installed scikit-learn with the same ``np.loadtxt`` call, without importing
    scikit-learn (its import, scipy included, took 2.4-3.7 s of every rank's start-up on a loaded 2-core machine);
    ``load_digits`` itself when that file is not where scikit-learn 1.x keeps it."""
    import gzip
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@DATASETS.register("digits", DigitsOptions)
def digits(options: DigitsOptions, **_) -> DataBundle:
    """scikit-learn digits, pixels scaled to [0, 1], shape 1x8x8, fixed seeded train/val split."""
    images, target = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(options.split_seed))
    n_val = int(round(len(y) * options.val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return DataBundle(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), (1, 8, 8), 10)


class SyntheticOptions(Options):
    num_train: int = Field(1024, ge=1)
    num_val: int = Field(256, ge=1)
    shape: List[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 8, 8], min_length=1,
                                                      description="per-example input shape, e.g. [1, 8, 8]")
    num_classes: int = Field(10, ge=2)
    seed: int = 0


@DATASETS.register("synthetic", SyntheticOptions)
def synthetic(options: SyntheticOptions, **_) -> DataBundle:
    """Random Gaussian inputs with labels from a fixed random linear teacher (benchmarks, tests)."""
    g = torch.Generator().manual_seed(options.seed)
    n = options.num_train + options.num_val
    x = torch.randn(n, *options.shape, generator=g)
    w = torch.randn(x[0].numel(), options.num_classes, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    tr = slice(0, options.num_train)
    va = slice(options.num_train, n)
    return DataBundle(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), tuple(options.shape),
                      options.num_classes)
