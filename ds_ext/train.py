"""``deepspeed --module ds_ext.train --recipe R`` / ``python -m ds_ext.train``: the trainer's entry point.

The trainer itself is ``ds_ext/trainer/``; this module only keeps the launch command short and stable.
"""
import os
import sys

from .trainer.cli import train_main as main

if __name__ == "__main__":
    code = main()
    if code == 0:
        # A finished run (summary written, wandb finished, process group destroyed) leaves without
        # interpreter teardown: a C++ thread destroyed while joinable there has aborted a finished run
        # ("terminate called without an active exception", SIGABRT) and turned its exit code non-zero.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)
