"""A pip user's install, from outside the checkout: the wheel built from this checkout goes into a fresh venv
(``python -m venv``, no system site-packages), and the installed commands run from a directory that is not the
checkout: ``python -m ds_ext``, ``ds-ext-train --help``, ``ds-ext methods list``, and the quickstart recipe under
DeepSpeed's launcher on 2 CPU processes.

Nothing is downloaded: the wheel is installed with ``--no-deps --no-index``, and a ``.pth`` file appends this test
venv's site-packages (torch, deepspeed, ...) to the fresh venv's path, after its own site-packages, so ``ds_ext``
itself comes from the wheel (checked) while its dependencies are the ones the suite runs with. A ``.pth`` path line
does not run that directory's own ``.pth`` files, so this checkout's editable install stays invisible.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.e2e.test_packaging import _copy_source
from tests.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{(r.stdout + r.stderr)[-5000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_quickstart(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    src = _copy_source(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
          "-q", "-w", str(tmp_path / "dist"), str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("ds_ext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "ds_ext/examples/hf_trainer.py" in z.namelist()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)  # no system site-packages
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)], tmp_path, env)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    away = tmp_path / "elsewhere"  # not the checkout, not the source copy
    away.mkdir()
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]))
    where = _run([str(py), "-c", "import ds_ext, sys; print(ds_ext.__file__); print(sys.flags.no_site)"],
                 away, env).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(site.resolve()), where  # the wheel's copy, not the checkout's

    usage = _run([str(py), "-m", "ds_ext", "--help"], away, env).stdout
    assert "subcommands:" in usage and "recipes" in usage and "methods" in usage, usage
    help_text = _run([str(venv / "bin" / "ds-ext-train"), "--help"], away, env).stdout
    assert "deepspeed --num_gpus N --module ds_ext.train" in help_text and "quickstart" in help_text, help_text
    assert "powersgd" in _run([str(venv / "bin" / "ds-ext"), "methods", "list"], away, env).stdout

    r = _run([str(py), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
              "--module", "ds_ext.train", "--recipe", "quickstart", "--set", "train.epochs=2"], away, env, timeout=900)
    text = r.stdout + r.stderr
    assert "final: val accuracy" in text, text[-4000:]
    assert (away / "runs" / "quickstart" / "summary.json").is_file()
    assert str(ROOT) not in text.replace(str(tmp_path), ""), "the run reached into the checkout"
