"""``python -m ds_ext <subcommand> ...``: the ``ds-ext`` command (``ds_ext/trainer/cli.py``) without the installed
script: ``train``, ``check``, ``recipes``, ``methods``, ``report``, ``schedule``, ``costmodel``."""
import sys

from .trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
