"""What checkpoint integrity costs (benchmark, not a test).

    python -m benchmarks.checkpoint [--models resnet50 vit_b16] [--dir /tmp] [--repeat 2]

For each model, the file a DeepSpeed fp32 ZeRO-0 checkpoint holds on rank 0 (the module's state plus
the optimizer's: SGD with momentum for ResNet-50, AdamW for ViT-B/16, as the QSR recipes train them)
is written with ``torch.save`` (fsynced, as ``ds_ext.trainer.checkpoint`` does), then fingerprinted and verified
with each ``checkpoint.integrity`` setting. The table gives seconds and the ratio to the write measured
in the same run. The file is read back from the page cache, as it is right after a save; a load on
another node reads it from disk or the network instead, where reading dominates. Verification is split
over the ranks in a run (each hashes its share of the files); one process here.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from ds_ext.deepspeed import checkpoint as ck


def _state(name: str) -> dict:
    from ds_ext.registry import MODELS, load_builtin

    load_builtin()
    model = MODELS.build(name, {})
    params = [p for p in model.parameters() if p.requires_grad]
    if name.startswith("vit"):
        opt = torch.optim.AdamW(params, lr=1e-3)
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # materialise the optimizer state
    return {"module": model.state_dict(), "optimizer": opt.state_dict()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, root: Path, repeat: int) -> dict:
    state = _state(name)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "mp_rank_00_model_states.pt"

    def write():
        with open(f, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    out = {"model": name, "bytes": 0}
    best = {}
    for _ in range(repeat):
        best["write"] = min(best.get("write", 1e9), _timed(write))
        for mode in ("hash", "size"):
            files = {}
            best[f"save_{mode}"] = min(best.get(f"save_{mode}", 1e9),
                                       _timed(lambda: files.update({f.name: ck.fingerprint(f, mode)})))
            best[f"load_{mode}"] = min(best.get(f"load_{mode}", 1e9),
                                       _timed(lambda: ck.verify_files(d, [f.name], files, mode)))
    out["bytes"] = f.stat().st_size
    out.update(best)
    f.unlink()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"])
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=2, help="best of N")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        rows = [measure(m, Path(tmp), a.repeat) for m in a.models]
    print(f"{'model':<10} {'file':>9} {'write':>8} {'hash at save':>16} {'hash at load':>16} {'size only':>10}")
    for r in rows:
        w = r["write"]
        print(f"{r['model']:<10} {r['bytes'] / 2**20:>6.0f} MiB {w:>7.2f}s "
              f"{r['save_hash']:>7.2f}s ({r['save_hash'] / w:4.2f}x) {r['load_hash']:>7.2f}s ({r['load_hash'] / w:4.2f}x) "
              f"{r['save_size'] * 1e3:>8.2f}ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
