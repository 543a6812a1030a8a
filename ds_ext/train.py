"""``deepspeed --module ds_ext.train --recipe R`` / ``python -m ds_ext.train``: the trainer's entry point.

The trainer itself is ``ds_ext/trainer/``; this module only keeps the launch command short and stable
(``ds-ext train`` is the same command).
"""
from .trainer.cli import exit_process, train_main as main

if __name__ == "__main__":
    exit_process(main())
