"""The Python half of ``bash run/gpu-check.sh --dry-run`` (no GPU, nothing installed): checks, in one interpreter
that has torch and deepspeed, that what the GPU check's steps call exists and accepts its arguments.

* each pytest selection of steps 4-6 (``DRY_SELECTIONS``, one shell-quoted line each) collects > 0 tests;
* ``tests/dist/cuda_syncs.py`` (steps 7, 10) parses ``--help`` / ``--list`` and lists a negative control;
* the benchmarks of step 9 (``DRY_BENCH``, one ``-m module args...`` per line) know every option passed;
* the trainer's overrides of steps 8 and 11 (``DRY_TRAIN``) validate (``ds_ext.train --check``, world 1 and 2);
* the pinned deepspeed (``DRY_DS_REQ``) is inside setup.cfg's window and the ZeRO bridge's
  ``ZERO_BRIDGE_DEEPSPEED``; the deepspeed launcher takes ``--no_local_rank``; ``ds_ext.ops.prepare`` and
  ``Communicator.force_collectives`` exist.

Prints one line per check and, when all passed, a last line that run/gpu-check.sh looks for; exit 1 when any fails.
"""
from __future__ import annotations

import configparser
import contextlib
import io
import os
import runpy
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU here; nothing below touches a device
FAILS = []
CHECKS = 0


def check(what: str, ok: bool, detail: str = "") -> None:
    global CHECKS
    CHECKS += 1
    print(f"[dry-run] {'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
    if not ok:
        FAILS.append(what)


def quiet_main(module: str, argv: list, path: bool = False):
    """``python -m module argv`` (``path``: a script file) in this process; (exit code, output)."""
    def run():
        if path:
            runpy.run_path(module, run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)

    saved = sys.argv
    sys.argv = [module] + argv
    try:
        return quiet_call(lambda _argv: run(), argv)
    finally:
        sys.argv = saved


def quiet_call(fn, argv: list):
    """``fn(argv)`` with its output captured; (exit code: its return value or SystemExit's, output)."""
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = fn(argv) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 -- reported as the check's failure
        code, _ = 1, out.write(f"{type(e).__name__}: {e}")
    return int(code), out.getvalue()


def collected(args: list) -> int:
    import pytest

    class Count:
        n = 0

        def pytest_collection_finish(self, session):
            Count.n = len(session.items)

    with contextlib.redirect_stdout(io.StringIO()):
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[Count()])
    return Count.n if code in (0, 5) else -1  # 5: nothing collected (the count, 0, says so)


def main() -> int:
    for line in filter(None, os.environ["DRY_SELECTIONS"].splitlines()):
        args = shlex.split(line)
        n = collected(args)
        check(f"pytest {' '.join(args)} collects tests", n > 0, f"{n} collected")

    code, out = quiet_main("tests/dist/cuda_syncs.py", ["--help"], path=True)
    check("tests/dist/cuda_syncs.py --help", code == 0 and "--cpu" in out)
    code, out = quiet_main("tests/dist/cuda_syncs.py", ["--list"], path=True)
    check("tests/dist/cuda_syncs.py --list", code == 0 and "negative control" in out and "topk exchange=union" in out,
          f"{len(out.splitlines())} methods")

    for line in filter(None, os.environ["DRY_BENCH"].splitlines()):
        words = shlex.split(line)
        module, opts = words[1], [w for w in words[2:] if w.startswith("--")]
        code, out = quiet_main(module, ["--help"])
        missing = [o for o in opts if o not in out]
        check(f"{module} --help knows {' '.join(opts)}", code == 0 and not missing, f"missing {missing}" if missing else "")

    from ds_ext.trainer.cli import train_main  # python -m ds_ext.train without exit_process (which os._exits)

    train = shlex.split(os.environ["DRY_TRAIN"])
    assert train[:2] == ["--module", "ds_ext.train"], train
    for world in (1, 2):
        argv = train[2:] + ["--set", "method.reducer={name: acpsgd}", "--check", "--world-size", str(world)]
        code, out = quiet_call(train_main, argv)
        check(f"ds_ext.train --check of the trainer steps' overrides (world {world})", code == 0,
              "" if code == 0 else out.strip().splitlines()[-1] if out.strip() else f"exit {code}")

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from ds_ext.deepspeed.zero import ZERO_BRIDGE_DEEPSPEED

    pin = Version(os.environ["DRY_DS_REQ"].split("==")[1])
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    spec = next(line.strip()[len("deepspeed"):] for line in cfg["options"]["install_requires"].splitlines()
                if line.strip().startswith("deepspeed"))
    lo, hi = ZERO_BRIDGE_DEEPSPEED
    check(f"deepspeed pin {pin} inside setup.cfg's {spec} and ZERO_BRIDGE_DEEPSPEED {lo}..{hi}",
          pin in SpecifierSet(spec) and lo <= pin.release[:2] < hi)

    from deepspeed.launcher.runner import parse_args

    try:
        ok = parse_args(["--num_gpus", "2", "--no_local_rank", "--master_port", "29500", "x.py"]).no_local_rank
    except SystemExit:
        ok = False
    check("the deepspeed launcher takes --no_local_rank", bool(ok))
    from ds_ext import ops
    from ds_ext.comm import Communicator

    check("ds_ext.ops.prepare and Communicator.force_collectives exist",
          callable(ops.prepare) and hasattr(Communicator, "force_collectives"))
    if FAILS:
        return 1
    print(f"[dry-run] all {CHECKS} Python checks passed")  # run/gpu-check.sh needs this line (no silent exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
