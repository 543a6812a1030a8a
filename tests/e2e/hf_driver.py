"""Launched by tests/e2e/test_hf.py under the real ``deepspeed`` launcher (2 processes): four Hugging Face Trainer
runs of run/hf_trainer.py's tiny GPT-2 in the same processes, each rank's results to ``OUT/rank<r>.pt``:
``deepspeed`` (no ds_ext block: DeepSpeed's own reduction), ``allreduce`` (ds_ext block), ``powersgd``
(saving a Trainer checkpoint at step 3) and ``resumed`` (powersgd from that checkpoint)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "run" / "hf_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).clone()


def main(out: str, steps: int = 6, save_at: int = 3, accumulation: int = 2) -> None:
    from accelerate.state import AcceleratorState

    ex = _example()
    rank = int(os.environ["RANK"])
    powersgd = {"reducer": {"name": "powersgd", "rank": 2, "start_powerSGD_iter": 0}}
    runs = {"deepspeed": (None, 0, None), "allreduce": ({"reducer": {"name": "allreduce"}}, 0, None),
            "powersgd": (powersgd, save_at, None), "resumed": (powersgd, save_at, f"checkpoint-{save_at}")}
    res = {}
    for key, (method, save_steps, resume) in runs.items():
        d = str(Path(out) / ("powersgd" if key == "resumed" else key))
        trainer, cb = ex.build_trainer(d, method, steps, save_steps=save_steps, accumulation=accumulation)
        trainer.train(resume_from_checkpoint=str(Path(d) / resume) if resume else None)
        rec = {"params": _params(trainer.model), "global_steps": int(trainer.model_wrapped.global_steps)}
        if cb is not None:
            m = cb.attachment.meter
            rec.update(by_kind=dict(m.by_kind), steps=m.steps, reducer=type(cb.attachment.reducer).__name__)
        if key == "powersgd":
            ck = Path(d) / f"checkpoint-{save_at}"
            rec["files"] = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())
        res[key] = rec
        cb.attachment.detach() if cb is not None else None
        trainer.model_wrapped.destroy()
        AcceleratorState._reset_state(reset_partial_state=False)  # the next Trainer brings its own DeepSpeed config
    torch.save(res, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0])
