"""``python -m ds_ext.compare RUN_DIR ... [--out cmp.png]``: the same as ``ds-ext compare`` (ds_ext/trainer/compare.py)."""
import sys

from .trainer.compare import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m ds_ext.compare"))
