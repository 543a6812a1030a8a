from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class DataBundle:
    """What a data set factory returns.

    ``train`` / ``val`` need ``__len__`` (orders shard ``range(len(train))``); they are indexable
    ``Dataset``s unless ``loader_factory`` is set. ``loader_factory`` (optional) builds the loader for a
    split itself, for pipelines that are not a map-style ``Dataset`` + torch ``DataLoader`` (FFCV:
    ``ds_ext.data.ffcv_imagenet``); it is called as ``loader_factory(split, indices, batch_size,
    num_workers=..., drop_last=..., seed=...)`` and must yield ``(x, y)`` batches visiting exactly
    ``indices`` in that order. Callers use ``bundle.loader(...)``, which falls back to ``make_loader``.
    """

    train: Dataset
    val: Dataset
    input_shape: Tuple[int, ...]
    num_classes: int
    loader_factory: Optional[Callable[..., Iterable]] = None

    def loader(self, split: str, indices: Sequence[int], batch_size: int, num_workers: int = 0,
               drop_last: bool = True, seed: int = 0) -> Iterable:
        """Batches of ``split`` ("train" or "val") visiting ``indices`` in the given order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if self.loader_factory is not None:
            return self.loader_factory(split, indices, batch_size, num_workers=num_workers, drop_last=drop_last,
                                       seed=seed)
        return make_loader(self.train if split == "train" else self.val, indices, batch_size, num_workers,
                           drop_last=drop_last, seed=seed)


class IndexSampler(Sampler):
    """Yields exactly the given (already ordered) example indices."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int = 0,
                drop_last: bool = True, seed: int = 0) -> DataLoader:
    # An explicit generator: creating the iterator must not draw from the global RNG, or a resumed run
    # (which creates its loader at a different point of the RNG stream) would not be bit-exact.
    # Workers ignore the stop signals (ds_ext.stop_signals): a rank saving on SIGTERM still needs them.
    from ..stop_signals import ignore_stop_signals

    return DataLoader(dataset, batch_size=batch_size, sampler=IndexSampler(indices), num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
