"""Build steps only: metadata lives in setup.cfg.

Recipes: ``build_py`` copies the top-level ``recipes/*.yaml`` into the built package as
``ds_ext/_recipes/*.yaml`` (real files in the wheel; MANIFEST.in puts ``recipes/`` in the sdist, so a wheel
built from the sdist has them too). ``ds_ext.trainer.recipe.bundled`` reads them there, or ``recipes/`` itself in a source
checkout or an editable install (which therefore skips the copy).

Prebuilt ops: ``DS_BUILD_OPS=1`` (every compatible op) or ``DS_BUILD_DS_EXT_COMM_CPU=1`` /
``DS_BUILD_DS_EXT_COMM_CUDA=1`` (one op, which must then build) compile the kernels of ``ds_ext/csrc`` at
install time through the op builders of ``ds_ext/op_builder`` (DeepSpeed's convention). The build needs
the installed torch and deepspeed, so install without build isolation: ``run/setup.sh`` does
``pip install --no-build-isolation -e .`` whenever a ``DS_BUILD_*`` variable is set. Without one, this is
a pure-Python install and the ops are JIT-built on first use (or fall back to torch).
"""
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RECIPES = ROOT / "recipes"
RECIPES_IN_PACKAGE = ("ds_ext", "_recipes")


class BuildPyWithRecipes(build_py):
    """build_py that also copies recipes/*.yaml to <build_lib>/ds_ext/_recipes/."""

    def _recipe_files(self):
        if getattr(self, "editable_mode", False):
            return []  # an editable install reads the checkout's recipes/ (ds_ext.trainer.recipe.bundled.recipe_dir)
        files = sorted(RECIPES.glob("*.yaml"))
        if not files:
            raise SystemExit(f"no recipes found in {RECIPES}: the wheel would ship without them")
        return files

    def run(self):
        super().run()
        dest = Path(self.build_lib, *RECIPES_IN_PACKAGE)
        files = self._recipe_files()
        if files:
            self.mkpath(str(dest))
        for f in files:
            self.copy_file(str(f), str(dest / f.name))

    def get_outputs(self, include_bytecode=True):
        dest = Path(self.build_lib, *RECIPES_IN_PACKAGE)
        return list(super().get_outputs(include_bytecode)) + [str(dest / f.name) for f in self._recipe_files()]


requested = any(k.startswith("DS_BUILD_") and v.strip() not in ("", "0") for k, v in os.environ.items())
ext_modules, cmdclass = [], {"build_py": BuildPyWithRecipes}
if requested:
    try:
        from ds_ext.op_builder import install_ext_modules
    except ImportError as e:  # an isolated build environment has neither torch nor deepspeed
        raise SystemExit(f"DS_BUILD_* is set but the op builders cannot be imported ({e}); torch and deepspeed must "
                         "be installed first and pip run with --no-build-isolation (run/setup.sh does both)")
    ext_modules = install_ext_modules()
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
