"""Only for prebuilt ops: metadata lives in setup.cfg.

``DS_BUILD_OPS=1`` (every compatible op) or ``DS_BUILD_DS_EXT_COMM_CPU=1`` / ``DS_BUILD_DS_EXT_COMM_CUDA=1``
(one op, which must then build) compile the kernels of ``ds_ext/csrc`` at install time through the op
builders of ``ds_ext/op_builder`` (DeepSpeed's convention). The build needs the installed torch and
deepspeed, so install without build isolation: ``run/setup.sh`` does
``pip install --no-build-isolation -e .`` whenever a ``DS_BUILD_*`` variable is set. Without one, this is
a pure-Python install and the ops are JIT-built on first use (or fall back to torch).
"""
import os

from setuptools import setup

requested = any(k.startswith("DS_BUILD_") and v.strip() not in ("", "0") for k, v in os.environ.items())
ext_modules, cmdclass = [], {}
if requested:
    try:
        from ds_ext.op_builder import install_ext_modules
    except ImportError as e:  # an isolated build environment has neither torch nor deepspeed
        raise SystemExit(f"DS_BUILD_* is set but the op builders cannot be imported ({e}); torch and deepspeed must "
                         "be installed first and pip run with --no-build-isolation (run/setup.sh does both)")
    ext_modules = install_ext_modules()
    if ext_modules:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
