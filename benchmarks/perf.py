"""Training throughput with synthetic input: the ACP-SGD seed's ``perf.sh`` / ``imagenet_benchmark.py``
through a DeepSpeed engine (``run/perf.sh``).

    deepspeed --num_gpus N --module benchmarks.perf --opt acpsgd --rank 4 --dnn resnet50 --bs 64

``--opt`` picks the reducer: ``ssgd`` (our bucketed allreduce; ``deepspeed`` for the engine's own),
``powersgd`` (rank ``--rank``, compression from iteration 3 as the seed's DDP ``powerSGD_hook``
baseline), ``acpsgd`` (rank ``--rank``). Models: ``resnet50``, ``resnet152`` (and the other ResNets),
``bert_base`` / ``bert_large`` when ``transformers`` is installed (sequence length ``--seq-len``).
As in the seed: fixed random input on the device, SGD with lr 0.01 x world size, ``--warmup`` batches,
then ``--iters`` timed iterations of ``--batches`` batches; prints img/s (or seq/s) per rank per
iteration and the mean +- std, total over ranks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

OPTS = {"ssgd": "allreduce", "deepspeed": "deepspeed", "powersgd": "powersgd", "acpsgd": "acpsgd"}


def reducer_spec(opt: str, rank: int) -> dict:
    if opt not in OPTS:
        raise SystemExit(f"--opt {opt!r}: choose one of {', '.join(OPTS)}")
    name = OPTS[opt]
    if name == "powersgd":
        return {"name": name, "matrix_approximation_rank": rank, "start_powerSGD_iter": 3}
    if name == "acpsgd":
        return {"name": name, "rank": rank}
    return {"name": name}


def build(dnn: str, seq_len: int, image_size: int = 224):
    """(model, make_batch(bs, device, dtype) -> (inputs, loss_fn))."""
    if dnn.startswith("bert"):
        try:
            import transformers
        except ImportError:
            raise SystemExit(f"--dnn {dnn} needs the `transformers` package (pip install transformers)") from None
        size = {"bert_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                "bert_large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096)}
        if dnn not in size:
            raise SystemExit(f"--dnn {dnn!r}: BERT models are bert_base and bert_large")
        model = transformers.BertForPreTraining(transformers.BertConfig(**size[dnn]))
        vocab = model.config.vocab_size

        def batch(bs, device, dtype):
            ids = torch.randint(0, vocab, (bs, seq_len), device=device)
            labels = torch.randint(0, vocab, (bs, seq_len), device=device)
            nsp = torch.randint(0, 2, (bs,), device=device)
            return (lambda m: m(input_ids=ids, labels=labels, next_sentence_label=nsp).loss)
        return model, batch

    from ds_ext.registry import MODELS, load_builtin

    load_builtin()
    if dnn not in MODELS:
        raise SystemExit(f"--dnn {dnn!r}: choose one of {', '.join(MODELS.names())}, bert_base, bert_large")
    model = MODELS.build(dnn, {})

    def batch(bs, device, dtype):
        x = torch.randn(bs, 3, image_size, image_size, device=device, dtype=dtype)
        y = torch.randint(0, 1000, (bs,), device=device)
        return (lambda m: F.cross_entropy(m(x).float(), y))
    return model, batch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--opt", default="acpsgd", help="ssgd | deepspeed | powersgd | acpsgd")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--dnn", default="resnet50")
    ap.add_argument("--bs", type=int, default=64, help="batch size per rank")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224, help="synthetic image side (the seed: 224)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batches", type=int, default=10, help="batches per timed iteration")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import deepspeed
    import torch.distributed as dist

    import ds_ext

    from ds_ext.comm import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = reducer_spec(args.opt, args.rank)
    torch.manual_seed(0)
    model, make_batch = build(args.dnn, args.seq_len, args.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * world)
    cfg = {"train_batch_size": args.bs * world, "train_micro_batch_size_per_gpu": args.bs,
           "gradient_accumulation_steps": 1, "steps_per_print": 10**12, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
           "bf16": {"enabled": args.precision == "bf16"}, "fp16": {"enabled": args.precision == "fp16"}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    att = ds_ext.attach(engine, {"reducer": spec})
    p0 = next(engine.module.parameters())
    loss_of = make_batch(args.bs, p0.device, p0.dtype)
    unit = "seq/s" if args.dnn.startswith("bert") else "img/s"

    def run(n):
        for _ in range(n):
            loss = loss_of(engine)
            engine.backward(loss)
            engine.step()
        if p0.device.type == "cuda":
            torch.cuda.synchronize()

    if rank == 0:
        print(f"# {args.dnn} opt={args.opt} reducer={spec} rank={args.rank} bs={args.bs} world={world} "
              f"image={args.image_size} precision={args.precision} device={p0.device} torch {torch.__version__}", flush=True)
    run(args.warmup)
    att.meter.total_bytes, att.meter.steps = 0, 0
    rates, iter_ms = [], []
    for i in range(args.iters):
        att.comm.barrier()
        t0 = time.perf_counter()
        run(args.batches)
        dt = time.perf_counter() - t0
        rates.append(args.bs * args.batches / dt)
        iter_ms.append(1e3 * dt / args.batches)
        if rank == 0:
            print(f"Iter #{i}: {rates[-1]:.1f} {unit} per rank, {iter_ms[-1]:.1f} ms/iteration", flush=True)
    if rank == 0:
        mean, std = statistics.mean(rates), (statistics.stdev(rates) if len(rates) > 1 else 0.0)
        print(f"{args.dnn} {args.opt}: iteration time {statistics.mean(iter_ms):.1f} ms; "
              f"{unit} per rank {mean:.1f} +- {1.96 * std:.1f}; total on {world} ranks {world * mean:.1f} +- "
              f"{world * 1.96 * std:.1f}; {att.meter.total_bytes / max(att.meter.steps, 1):,.0f} bytes sent per "
              f"rank per iteration", flush=True)
    att.comm.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
