"""``deepspeed --module ds_ext.train --recipe R`` / ``python -m ds_ext.train``: the trainer's entry point.

The trainer itself is ``ds_ext/trainer/``; this module only keeps the launch command short and stable.
"""
from .trainer.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
