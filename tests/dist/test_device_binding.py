"""Issue 27 N1: every rank binds its own accelerator device (``LOCAL_RANK``) before its first collective.

On a node with several GPUs, torch's object collectives stage on the *current* device and DeepSpeed binds
the default NCCL group to ``cuda:LOCAL_RANK``; a collective made on cuda:0 by rank 1 is refused ("Tensor
found on device cuda:0 but backend constrained to cuda:1"). The trainer exchanges start-up verdicts, and
``node_mpu`` a topology, before ``deepspeed.initialize`` (which is where DeepSpeed's engine sets the
device). No GPU is needed to see it: the ranks run on gloo under a CPU accelerator that pretends to own
one device per local rank (``PerRankDevices``: ``set_device`` records, ``current_device`` answers), and
every ``torch.distributed`` collective records the device that was current when it was entered.
"""
from __future__ import annotations

import os
from pathlib import Path

from tests import harness

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")
_COLLECTIVES = ("all_gather_object", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
                "broadcast_object_list", "barrier", "reduce_scatter_tensor", "new_group")


def _watch_devices():
    """Install the pretend accelerator and wrap the collectives; returns (accelerator, record list)."""
    import deepspeed.comm as dc
    import torch.distributed as dist
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class PerRankDevices(CPU_Accelerator):
        def __init__(self):
            super().__init__()
            self.current, self.set_calls = 0, []

        def set_device(self, device_index):
            self.set_calls.append(int(device_index))
            self.current = int(device_index)

        def current_device(self):
            return self.current

        def device_count(self):
            return int(os.environ["LOCAL_SIZE"])

    acc = PerRankDevices()
    set_accelerator(acc)
    seen = []
    for mod in (dist, dc):  # DeepSpeed's backend may hold torch's functions from before the patch
        for name in _COLLECTIVES:
            orig = getattr(mod, name, None)
            if orig is None:
                continue

            def wrapped(*a, _orig=orig, _name=f"{mod.__name__}.{name}", **k):
                seen.append((_name, acc.current))
                return _orig(*a, **k)

            setattr(mod, name, wrapped)
    return acc, seen


def trainer_devices(rank, world, run_dir):
    acc, seen = _watch_devices()
    from ds_ext.trainer.cli import train_main

    argv = ["--recipe", QUICK, "--set", "train.epochs=1", "--set", f"log.dir={run_dir}",
            "--set", "log.wandb.mode=disabled", "--set", "log.progress=false", "--set", "train.steps_per_epoch=3"]
    rc = train_main(argv)
    return {"rc": rc, "seen": seen, "set_calls": acc.set_calls}


def node_mpu_devices(rank, world):
    acc, seen = _watch_devices()
    from ds_ext.deepspeed.zero import node_mpu

    node_mpu()  # before deepspeed.initialize, as its docstring tells own loops
    return {"seen": seen, "set_calls": acc.set_calls}


def _check(results):
    for rank, r in enumerate(results):
        wrong = [(name, dev) for name, dev in r["seen"] if dev != rank]
        assert r["seen"], f"rank {rank} made no collective: the check saw nothing"
        assert not wrong, f"rank {rank} entered collectives on device {wrong[:3]} (its own is {rank})"
        assert rank == 0 or rank in r["set_calls"], r["set_calls"]  # rank 0's device is current already


def test_trainer_binds_each_rank_device_before_its_first_collective(tmp_path):
    res = harness.run(trainer_devices, 2, run_dir=str(tmp_path), timeout=240)
    assert [r["rc"] for r in res] == [0, 0]
    assert any(name.endswith("all_gather_object") for name, _ in res[1]["seen"])  # the start-up verdicts are seen
    _check(res)


def test_node_mpu_binds_the_device_before_its_exchange():
    _check(harness.run(node_mpu_devices, 2, timeout=120))
