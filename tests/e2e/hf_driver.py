"""Launched by tests/e2e/test_hf.py under the real ``deepspeed`` launcher (2 processes): Hugging Face Trainer runs
of ds_ext/examples/hf_trainer.py's tiny GPT-2 in the same processes, each rank's results to ``OUT/rank<r>.pt``:
``deepspeed`` (no ds_ext block: DeepSpeed's own reduction), ``allreduce`` (ds_ext block), ``powersgd``
(saving a Trainer checkpoint at step 3) and ``resumed`` (powersgd from that checkpoint); then, for each damage
case named after ``OUT`` (``tests/dist/workers_ckpt.damage``), a copy of that checkpoint damaged by rank 0 and
resumed from (what ``trainer.train`` raised, or the parameters it ended with). ``--only-powersgd``: skip the
``deepspeed`` and ``allreduce`` runs."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # tests.dist.workers_ckpt (the damage cases)
    sys.path.insert(0, str(ROOT))


def _example():
    from ds_ext.examples import hf_trainer

    return hf_trainer


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).clone()


def _damaged_copy(out: str, case: str, save_at: int) -> tuple:
    """Rank 0 copies ``powersgd/checkpoint-<save_at>`` to ``case-<case>/`` and damages it; (dir, named file)."""
    from ds_ext.comm import Communicator
    from tests.dist.workers_ckpt import damage

    d = Path(out) / f"case-{case}"
    named = None
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(Path(out) / "powersgd" / f"checkpoint-{save_at}", d / f"checkpoint-{save_at}")
        named = damage(case, d / f"checkpoint-{save_at}", f"global_step{save_at}")
    return d, Communicator().all_gather_object(named)[0]


def main(out: str, cases=(), only_powersgd: bool = False, steps: int = 6, save_at: int = 3,
         accumulation: int = 2) -> None:
    from accelerate.state import AcceleratorState

    ex = _example()
    rank = int(os.environ["RANK"])
    powersgd = {"reducer": {"name": "powersgd", "rank": 2, "start_powerSGD_iter": 0}}
    runs = {} if only_powersgd else {"deepspeed": (None, 0, None), "allreduce": ({"reducer": {"name": "allreduce"}}, 0,
                                                                                None)}
    runs.update({"powersgd": (powersgd, save_at, None), "resumed": (powersgd, save_at, f"checkpoint-{save_at}")})
    runs.update({f"case-{c}": (powersgd, save_at, f"checkpoint-{save_at}") for c in cases})
    res = {}
    for key, (method, save_steps, resume) in runs.items():
        d = str(Path(out) / ("powersgd" if key == "resumed" else key))
        if key.startswith("case-"):
            path, named = _damaged_copy(out, key[len("case-"):], save_at)
            d, res[key] = str(path), {"named": named, "error": None, "params": None}
        trainer, cb = ex.build_trainer(d, method, steps, save_steps=save_steps, accumulation=accumulation)
        try:
            trainer.train(resume_from_checkpoint=str(Path(d) / resume) if resume else None)
        except Exception as e:  # noqa: BLE001 -- a damage case: the test reads what was raised
            if not key.startswith("case-"):
                raise
            res[key].update(error=str(e), type=type(e).__name__)
        else:
            rec = {"params": _params(trainer.model), "global_steps": int(trainer.model_wrapped.global_steps)}
            if cb is not None:
                m = cb.attachment.meter
                rec.update(by_kind=dict(m.by_kind), steps=m.steps, reducer=type(cb.attachment.reducer).__name__)
            if key == "powersgd":
                ck = Path(d) / f"checkpoint-{save_at}"
                rec["files"] = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())
            res.setdefault(key, {}).update(rec)
        cb.attachment.detach() if cb is not None and cb.attachment is not None else None
        trainer.model_wrapped.destroy()
        AcceleratorState._reset_state(reset_partial_state=False)  # the next Trainer brings its own DeepSpeed config
    torch.save(res, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    only = "--only-powersgd" in args
    args = [a for a in args if a != "--only-powersgd"]
    main(args[0], cases=args[1:], only_powersgd=only)
    # tear the process group down before interpreter exit, as the trainer does: left to the c10d / gloo destructors
    # at exit, a finished run has aborted with "terminate called without an active exception" (exit 250)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
