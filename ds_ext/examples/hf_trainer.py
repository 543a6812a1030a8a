"""Example: a Hugging Face ``transformers.Trainer`` running a ds_ext method, chosen in the ``ds_ext`` block of
an ordinary DeepSpeed config (see ``ds_ext/hf.py``). A 2-layer GPT-2 built from a config (no download) learns
a synthetic next-token task; the method's bytes are printed at the end.

    deepspeed --num_gpus 2 --module ds_ext.examples.hf_trainer            # powersgd rank 2, CPU or GPU
    accelerate launch --use_deepspeed --num_processes 2 -m ds_ext.examples.hf_trainer --steps 8
    deepspeed --num_gpus 2 --module ds_ext.examples.hf_trainer --method '{"reducer": {"name": "acpsgd", "rank": 4}}' --zero 1
    deepspeed --num_gpus 2 --module ds_ext.examples.hf_trainer --method none   # DeepSpeed's own reduction
    bash run/hf-trainer.sh [same options]                                  # in a checkout: the same, set up first

On CPU set ``DS_ACCELERATOR=cpu``. Needs ``pip install 'ds_ext[hf]'`` (``run/setup.sh`` installs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def tiny_model(seed: int = 0):
    """A 2-layer GPT-2 from a config (vocabulary 64, width 32), dropout off, the same weights on every rank."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class CountingTask(torch.utils.data.Dataset):
    """Sequences that count up from a random start modulo 64 (next token = token + step): learnable."""

    def __init__(self, n: int = 512, length: int = 32):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        start, step = torch.randint(0, 64, (2,), generator=g).tolist()
        ids = (start + (1 + step % 3) * torch.arange(self.length)) % 64
        return {"input_ids": ids, "labels": ids}


def ds_config(method, zero: int = 0) -> dict:
    """An ordinary DeepSpeed config for the Trainer ("auto": the Trainer fills the batch sizes), with the method
    in its ``ds_ext`` block (none: DeepSpeed's own gradient reduction)."""
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "zero_optimization": {"stage": zero}}
    if method is not None:
        cfg["ds_ext"] = method
    return cfg


def build_trainer(out_dir: str, method, steps: int, zero: int = 0, save_steps: int = 0, batch: int = 4,
                  accumulation: int = 1, lr: float = 3e-3, seed: int = 0):
    """``(trainer, callback)``: the Trainer on ``tiny_model`` with ``ds_config(method, zero)``; the callback
    (None without a method) attaches ds_ext when training begins."""
    from transformers import Trainer, TrainingArguments

    import ds_ext.hf

    extra = ds_ext.hf.cpu_deepspeed_state() if not torch.cuda.is_available() else {}
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps,
                             gradient_accumulation_steps=accumulation, learning_rate=lr, max_grad_norm=0.0,
                             lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, steps // 4),
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0,
                             dataloader_pin_memory=False, disable_tqdm=True, deepspeed=ds_config(method, zero),
                             **extra)
    trainer = Trainer(model=tiny_model(seed), args=args, train_dataset=CountingTask())
    callback = ds_ext.hf.attach_to_trainer(trainer) if method is not None else None
    return trainer, callback


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default='{"reducer": {"name": "powersgd", "rank": 2, "start_powerSGD_iter": 0}}',
                    help="the ds_ext block as JSON, or 'none' for DeepSpeed's own reduction")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--zero", type=int, default=0, help="ZeRO stage (0, 1 or 2)")
    ap.add_argument("--out", default="runs/hf-trainer")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    a = ap.parse_args(argv)
    try:
        method = None if a.method == "none" else json.loads(a.method)
    except json.JSONDecodeError as e:
        print(f"--method: not JSON ({e}); e.g. '{{\"reducer\": {{\"name\": \"acpsgd\", \"rank\": 4}}}}'",
              file=sys.stderr)
        return 2
    try:
        if not torch.cuda.is_available():
            import ds_ext.hf

            ds_ext.hf.cpu_deepspeed_state()  # here only for its one-line error when no launcher started us
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer, cb = build_trainer(a.out, method, a.steps, zero=a.zero)
        result = trainer.train()
    except ValueError as e:  # a bad ds_ext block, or a method that cannot run here: one line, every rank
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        line = f"final training loss {result.training_loss:.4f} over {a.steps} steps"
        if cb is not None:
            m = cb.attachment.meter
            line += (f"; ds_ext {type(cb.attachment.reducer).__name__}: {m.total_bytes / max(1, m.steps) / 1024:.1f} "
                     f"KiB per rank per step (" + ", ".join(f"{k} {v}" for k, v in sorted(m.by_kind.items())) + ")")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
