"""The trainer's evaluation (``evaluate``: validation loss and accuracy over all ranks) and the loader of
microbatches of different sizes (``_batch_loader``), used by ``ds_ext.trainer.loop``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..comm import Communicator
from ..stop_signals import ignore_stop_signals


def _batch_loader(dataset, batches, num_workers: int, seed: int):
    """A ``DataLoader`` yielding one microbatch per list of ``batches`` (example indices; the lists may differ
    in length: ``remainder: visit`` of the dgrab orders), with ``make_loader``'s settings otherwise."""
    return DataLoader(dataset, batch_sampler=[list(b) for b in batches], num_workers=num_workers,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None)


def evaluate(engine, bundle, batch_size: int, rank: int, world: int, comm=None) -> dict:
    """Each rank scores a strided shard of the validation set; the sums stay on the communication
    device (no host read per batch), are all-reduced there and read once."""
    comm = comm if comm is not None else Communicator()
    module = engine.module
    p0 = next(module.parameters())
    was_training = module.training
    module.eval()
    stats = comm.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for x, y in bundle.loader("val", range(rank, len(bundle.val), world), batch_size, drop_last=False):
            x = x.to(p0.device, dtype=p0.dtype if x.is_floating_point() else x.dtype, non_blocking=True)
            out = module(x).float()
            y = y.to(out.device, non_blocking=True)
            losses = F.cross_entropy(out, y, reduction="none")
            stats[0] += losses.sum().to(stats.device, torch.float64)
            stats[1] += (out.argmax(1) == y).sum().to(stats.device, torch.float64)
            stats[2] += y.numel()  # tokens for a language model
            stats[3] += (~torch.isfinite(losses)).sum().to(stats.device, torch.float64)
    comm.all_reduce(stats)
    module.train(was_training)
    loss_sum, correct, total, nonfinite = stats.tolist()
    n = max(total, 1.0)
    out = {"val_loss": loss_sum / n, "val_acc": correct / n, "val_correct": int(correct), "val_total": int(total)}
    if nonfinite:  # only then: the run stops on it (Trainer.evaluate)
        out["val_nonfinite"] = int(nonfinite)
    return out
