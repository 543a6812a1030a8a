from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    input_shape: Tuple[int, ...]
    num_classes: int


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
    return DataLoader(dataset, batch_size=batch_size, sampler=IndexSampler(indices), num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available())
