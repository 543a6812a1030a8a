"""Packaging: the wheel (and sdist) carry the recipes and the PEP 561 marker, the declared dependency range
matches the DeepSpeed internals ds_ext.deepspeed.attach patches, ``python -m ds_ext.trainer.recipe.bundled`` works from an installed
wheel, and ``import ds_ext`` stays light.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``) from a copy of the files a build
reads, so the shared checkout gets no build/ or egg-info; it is "installed" by unpacking it (a pure-Python
wheel) and put first on PYTHONPATH of the subprocesses, ahead of the editable install.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "DESCRIPTION.md", "LICENSE",
                "recipes")
CLI_TIMEOUT = 120


def _copy_source(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in BUILD_INPUTS:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    shutil.copytree(ROOT / "ds_ext", dest / "ds_ext", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return dest


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    return _copy_source(tmp_path_factory.mktemp("pkg") / "src")


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(out), str(source_copy)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("ds_ext-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(d)
    return d


def _run(args, site: Path, cwd: Path):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)


def _cli(args, site, cwd):
    return _run(["-m", "ds_ext.trainer.recipe.bundled", *args], site, cwd)


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


# ---- what the built artefacts contain -------------------------------------------------------------

def test_top_level_recipes_stay():
    assert (ROOT / "recipes" / "quickstart.yaml").is_file()  # run/ scripts and the README use this path
    assert len(RECIPES) >= 2


def test_wheel_contains_every_recipe_and_py_typed(wheel, source_copy):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in RECIPES:
            member = f"ds_ext/_recipes/{f.name}"
            assert member in names, f"{f.name} missing from {wheel.name}"
            assert z.read(member) == f.read_bytes(), f"{member} differs from recipes/{f.name}"
        assert "ds_ext/py.typed" in names
        assert "ds_ext/trainer/recipe/bundled.py" in names and "ds_ext/__init__.py" in names
    # nothing of the package left behind: every file of the built copy's ds_ext/ (modules, and data such as
    # csrc/ and cards/; __pycache__, *.pyc and built *.so were not copied)
    for f in (source_copy / "ds_ext").rglob("*"):
        rel = f.relative_to(source_copy).as_posix()
        assert not f.is_file() or rel in names, f"{rel} is not in the wheel (setup.cfg package_data?)"
    bundled = {n for n in names if n.startswith("ds_ext/_recipes/")}
    assert bundled == {f"ds_ext/_recipes/{f.name}" for f in RECIPES}
    assert not any(n.startswith("recipes/") for n in names), "recipes/ must not become a top-level install dir"


def test_sdist_contains_recipes(source_copy, tmp_path):
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=source_copy,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = tmp_path.glob("ds_ext-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in RECIPES:
        assert f"recipes/{f.name}" in names
    assert {"ds_ext/py.typed", "MANIFEST.in", "setup.py"} <= names


def test_description_and_license(wheel):
    """A pip user's page is DESCRIPTION.md (not the README, which opens with the checkout's scripts), with the pip
    install lines; the Apache-2.0 text ships in the wheel; the HF example and ``python -m ds_ext`` are installed."""
    meta = _metadata(wheel)
    body = meta.split("\n\n", 1)[1]
    assert body.startswith("# ds_ext") and "bash run/" not in body.split("```")[0], body[:300]
    assert "download.pytorch.org/whl/cpu" in body
    assert re.search(r"^License(-Expression)?: Apache-2.0$", meta, re.M), meta[:800]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        lic = [n for n in names if n.endswith("LICENSE") and ".dist-info/" in n]
        assert lic and "Apache License" in z.read(lic[0]).decode(), names
        assert {"ds_ext/__main__.py", "ds_ext/examples/hf_trainer.py"} <= set(names)


def _zero_bridge_range():
    trees = [ast.parse(f.read_text()) for f in sorted((ROOT / "ds_ext" / "deepspeed").glob("*.py"))]
    for node in (n for tree in trees for n in tree.body):
        targets = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "ZERO_BRIDGE_DEEPSPEED" in targets:
            return ast.literal_eval(node.value)
    pytest.fail("ZERO_BRIDGE_DEEPSPEED not found in ds_ext/deepspeed/")


def test_declared_dependencies(wheel):
    reqs = re.findall(r"^Requires-Dist: (.+)$", _metadata(wheel), re.M)
    plain = {re.split(r"[<>=!~ ;\[]", r, 1)[0].lower(): r for r in reqs if "extra ==" not in r}
    # the deepspeed range is the one ZeroBridge is written against
    (lo, hi) = _zero_bridge_range()
    spec = set(plain["deepspeed"][len("deepspeed"):].split(","))
    assert spec == {f">={lo[0]}.{lo[1]}", f"<{hi[0]}.{hi[1]}"}, plain["deepspeed"]
    assert "matplotlib" not in plain and "numba" not in plain  # research tools are extras, not install requirements
    bench = {r.split(";")[0].strip().split(">")[0] for r in reqs if 'extra == "bench"' in r}
    assert bench == {"numba", "matplotlib"}
    hf = {r.split(";")[0].strip() for r in reqs if 'extra == "hf"' in r}
    assert hf == {"transformers>=4.40", "accelerate>=0.30"}


# ---- python -m ds_ext.trainer.recipe.bundled from the installed wheel -------------------------------------------

QUICK = ROOT / "recipes" / "quickstart.yaml"
EDITED = "edited: true\n"


@pytest.fixture(scope="module")
def cli(site, tmp_path_factory):
    """Every subprocess case, each in its own working directory, run two at a time (each interpreter pays
    the ~3 s ``import ds_ext``): {case: (CompletedProcess, cwd)}."""
    cases = {
        "list": ["list"],
        "show": ["show", "quickstart"],
        "show-unknown": ["show", "no-such-recipe"],
        "copy": ["copy", "quickstart"],  # default DEST: ./quickstart.yaml
        "copy-existing": ["copy", "quickstart"],  # ./quickstart.yaml exists: refused
        # not the recipes CLI: a fresh interpreter importing the installed package
        "import": ["-c", "import sys, ds_ext; print(ds_ext.__file__); "
                         "print(','.join(m for m in ('deepspeed', 'wandb', 'matplotlib') if m in sys.modules))"],
    }
    base = tmp_path_factory.mktemp("cli")
    cwds = {}
    for name in cases:
        cwds[name] = base / name
        cwds[name].mkdir()
    (cwds["copy-existing"] / "quickstart.yaml").write_text(EDITED)
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run if name == "import" else _cli, args, site, cwds[name])
                   for name, args in cases.items()}
        return {name: (f.result(), cwds[name]) for name, f in futures.items()}


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_cli_list(cli):
    r, _ = cli["list"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [f.stem for f in RECIPES]
    quick = next(ln for ln in lines if ln.split()[0] == "quickstart")
    first = QUICK.read_text().splitlines()[0].lstrip("# ")
    assert first[:40] in quick  # the description comes from the leading comment
    assert all(len(ln) < 140 for ln in lines)


def test_cli_show(cli):
    r, _ = cli["show"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == QUICK.read_text()


def test_cli_unknown_name(cli):
    r, cwd = cli["show-unknown"]
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    line = _one_line(r.stderr)
    assert "no-such-recipe" in line and "quickstart" in line and RECIPES[0].stem in line


def test_cli_copy(cli):
    r, cwd = cli["copy"]
    assert r.returncode == 0, r.stderr
    assert (cwd / "quickstart.yaml").read_text() == QUICK.read_text()


def test_cli_copy_refuses_to_overwrite(cli):
    r, cwd = cli["copy-existing"]
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "quickstart.yaml" in line and "exists" in line
    assert (cwd / "quickstart.yaml").read_text() == EDITED, "an existing file was overwritten"


def test_copy_into_directory(tmp_path, monkeypatch, capsys):
    from ds_ext.trainer.recipe.bundled import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    other = RECIPES[0]
    assert main(["copy", other.stem + ".yaml", "mine"]) == 0  # a directory DEST gets NAME.yaml
    assert (tmp_path / "mine" / other.name).read_text() == other.read_text()
    assert main(["copy", other.stem, "mine"]) == 2
    assert main(["copy", "quickstart", str(tmp_path / "no" / "dir" / "q.yaml")]) == 2
    assert main(["copy", "no-such-recipe", "x.yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "exists" in err[0] and "cannot write" in err[1] and "no-such-recipe" in err[2]
    assert not (tmp_path / "x.yaml").exists()


# ---- in-process helpers ---------------------------------------------------------------------------

def test_describe():
    from ds_ext.trainer.recipe.bundled import describe

    assert describe("name: x\n") == ""
    assert describe("# Short one. Second sentence.\n#   an indented usage line\nname: x\n") == "Short one."
    long = "# " + " ".join(["word"] * 60) + "\nname: x\n"
    d = describe(long, width=50)
    assert len(d) <= 50 and d.endswith("...") and d.startswith("word word")


def test_load_recipe_bare_bundled_name(tmp_path, monkeypatch):
    import ds_ext

    monkeypatch.chdir(tmp_path)
    r = ds_ext.load_recipe("quickstart", overrides=["train.epochs=2"])
    assert r.name == "quickstart" and r.train.epochs == 2
    assert Path(r.source).resolve() == (ROOT / "recipes" / "quickstart.yaml").resolve()
    (tmp_path / "quickstart").write_text((ROOT / "recipes" / "quickstart.yaml").read_text())
    assert ds_ext.load_recipe("quickstart").source == "quickstart"  # an existing file comes first
    with pytest.raises(ds_ext.RecipeError, match="not found"):
        ds_ext.load_recipe("no-such-recipe")


# ---- import cost ----------------------------------------------------------------------------------

def test_import_ds_ext_is_light(cli, site):
    r, _ = cli["import"]
    assert r.returncode == 0, r.stderr
    path, heavy = r.stdout.splitlines()
    assert Path(path).resolve().is_relative_to(site.resolve()), path  # the unpacked wheel, not the checkout
    assert heavy == "", f"import ds_ext imported {heavy}"
