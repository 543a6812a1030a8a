from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

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


# ---- checks on the data a run loads (ds_ext.trainer.setup.check_data) -------------------------------------

def _in_memory(dataset: Dataset, which: int):
    """Tensor ``which`` (0: inputs, -1: labels) of every example when ``dataset`` holds it in memory: a
    ``TensorDataset``'s tensor, or (labels) a ``labels`` attribute with one entry per example (CIFAR, ffcv's
    ``BetonSplit``); None otherwise (e.g. Criteo's rows, read from a memory map per batch)."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) >= 2:
        return tensors[which]
    labels = getattr(dataset, "labels", None) if which == -1 else None
    if labels is not None and getattr(labels, "ndim", 0) >= 1 and len(labels) == len(dataset):
        return torch.as_tensor(labels)
    return None


def label_problem(dataset: Dataset, classes: int, split: str) -> Optional[str]:
    """The first label of ``dataset`` outside the ``classes`` classes a model scores (``cross_entropy``
    needs 0 <= label < classes, or its ignore_index -100), as one sentence naming the label and the example;
    None when every label fits or the labels are not held in memory. One pass on the host, once."""
    labels = _in_memory(dataset, -1)
    if labels is None or labels.is_floating_point() or labels.numel() == 0:
        return None
    flat = labels.reshape(len(labels), -1)
    for start in range(0, len(flat), 1 << 20):
        chunk = flat[start:start + (1 << 20)]
        bad = ((chunk < 0) & (chunk != -100)) | (chunk >= classes)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            return (f"label {int(chunk[row, col])} of {split} example {start + row} is outside the model's "
                    f"{classes} classes (allowed labels: 0 to {classes - 1})")
    return None


def nonfinite_examples(dataset: Dataset) -> Tuple[int, Optional[int]]:
    """``(count, first index)`` of the examples of ``dataset`` whose floating-point inputs hold a NaN or an
    infinity, when the inputs are held in memory (a ``TensorDataset``); ``(0, None)`` otherwise. One pass on
    the host, in chunks, once."""
    x = _in_memory(dataset, 0)
    if x is None or not x.is_floating_point() or x.numel() == 0:
        return 0, None
    count, first = 0, None
    flat = x.reshape(len(x), -1)
    for start in range(0, len(flat), 1 << 16):
        bad = ~torch.isfinite(flat[start:start + (1 << 16)]).all(1)
        n = int(bad.sum())
        if n and first is None:
            first = start + int(bad.nonzero()[0, 0])
        count += n
    return count, first


def nonfinite_inputs(dataset: Dataset, indices: Sequence[int]) -> List[int]:
    """The indices among ``indices`` whose input (``dataset[i][0]``, read on the host) holds a NaN or an
    infinity. For naming the data after a skipped step; the global RNG is left as it was (an augmenting data
    set draws from it)."""
    bad = []
    with torch.random.fork_rng(devices=[]):
        for i in indices:
            x = dataset[int(i)][0]
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad.append(int(i))
    return bad
