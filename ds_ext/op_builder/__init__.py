"""DeepSpeed op builders for the compressed-allreduce kernels (``ds_ext/csrc``).

Design notes (the reasons behind each choice, measurements, deviations): ``docs/dev/notes/op-builder.md``.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from deepspeed.ops.op_builder.builder import CUDAOpBuilder, OpBuilder, installed_cuda_version
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

PKG_DIR = Path(__file__).resolve().parent.parent
CSRC = PKG_DIR / "csrc"
TORCH_VERSION = int(torch.__version__.split(".")[0]) * 100 + int(torch.__version__.split(".")[1])
# JIT builds are cached per checkout: the extension name carries a hash of this package's directory (and
# of the torch version), so two checkouts (or two torch versions) never rebuild over each other's cache
# (torch keeps one build directory per extension name under TORCH_EXTENSIONS_DIR)
CHECKOUT_TAG = hashlib.sha1(f"{PKG_DIR}|{torch.__version__}".encode()).hexdigest()[:8]
# TORCH_CUDA_ARCH_LIST of a prebuilt (setup.py / DS_BUILD_*) CUDA op when the variable is unset: machine
# code for A100 and H100, and PTX for sm_90 so that newer GPUs (sm_100, sm_120) JIT-compile it at load
PREBUILT_ARCH_LIST = "8.0;9.0+PTX"


def extra_flags(var: str) -> List[str]:
    """Extra compiler flags from the environment (``DS_EXT_CXX_FLAGS`` for the C++ compiler,
    ``DS_EXT_NVCC_FLAGS`` for nvcc; shell-quoted), e.g. ``DS_EXT_NVCC_FLAGS="-Xcompiler -Wall,-Wextra"``
    (``run/cuda-build-check.sh``). They change the JIT build's flags, so torch rebuilds the op."""
    return shlex.split(os.environ.get(var, ""))


def build_requested(build_var: str, env=None) -> bool:
    """DeepSpeed's convention: a per-op ``DS_BUILD_<OP>`` wins, else ``DS_BUILD_OPS``."""
    env = os.environ if env is None else env
    v = env.get(build_var)
    if v is None:
        v = env.get("DS_BUILD_OPS", "0")
    return v.strip() not in ("", "0")


class _DsExtOp:
    """Shared by both builders: absolute sources, prebuilt-or-JIT loading, self-explaining checks."""
    NAME = ""
    BUILD_VAR = ""
    DEVICE = ""
    SOURCES: Tuple[str, ...] = ()

    def __init__(self):
        # NAME: the op (prebuilt module ``absolute_name()``, build variable, report); ``self.name``: the
        # JIT extension and DeepSpeed's loaded-op cache key, per checkout (see CHECKOUT_TAG)
        super().__init__(name=f"{self.NAME}_{CHECKOUT_TAG}")
        self.loaded_from: Optional[str] = None     # "prebuilt" | "jit" | "cached" after load()
        self.prebuilt_problem: Optional[str] = None

    def absolute_name(self) -> str:
        return f"ds_ext.op_builder.{self.NAME}"

    def sources(self) -> List[str]:
        return [str(CSRC / s) for s in self.SOURCES]

    def include_paths(self) -> List[str]:
        return []

    # -- compatibility ------------------------------------------------------------------------------
    def problems(self) -> List[str]:
        """Why this op cannot be built here ([] when it can)."""
        out = []
        missing = [s for s in self.sources() if not os.path.exists(s)]
        if missing:
            out.append(f"sources missing: {', '.join(missing)}")
        cxx = os.environ.get("CXX", "c++")
        if not (shutil.which(cxx) or shutil.which("g++")):
            out.append(f"no C++ compiler ({cxx!r} / 'g++' not on PATH)")
        return out

    def is_compatible(self, verbose=False) -> bool:
        probs = self.problems()
        if probs:
            self.error_log = "; ".join(probs)
            if verbose:
                self.warning(f"{self.NAME} is not compatible: {self.error_log}")
            return False
        return super().is_compatible(verbose)

    # -- loading ------------------------------------------------------------------------------------
    def prebuilt_module(self):
        """The install-time module, or None (reason in ``prebuilt_problem``)."""
        try:
            mod = importlib.import_module(self.absolute_name())
        except ImportError as e:
            self.prebuilt_problem = f"not prebuilt ({e})"
            return None
        built = int(mod.torch_version())
        if built != TORCH_VERSION:
            self.prebuilt_problem = (f"prebuilt against torch {built // 100}.{built % 100}, running torch "
                                     f"{torch.__version__}: ignored, rebuilt JIT")
            return None
        self.prebuilt_problem = None
        return mod

    def load(self, verbose=False):
        cache = OpBuilder._loaded_ops
        if self.name in cache:
            self.loaded_from = self.loaded_from or "cached"
            return cache[self.name]
        mod = self.prebuilt_module()
        if mod is not None:
            cache[self.name] = mod
            self.loaded_from = "prebuilt"
            return mod
        from ..build_lock import owned_build  # here: this file also loads alone (test_jit_build_cache_per_checkout)

        self.before_build()
        with owned_build(self.jit_build_dir()):  # a killed build's torch lock is cleared, not waited on
            mod = self.jit_load(verbose)
        self.loaded_from = "jit"
        return mod

    def before_build(self) -> None:
        """Slow queries of the build's flags, made before ``owned_build``'s lock so that ranks loading the op
        at once do not queue behind them (``docs/dev/notes/build-lock.md``)."""

    def jit_build_dir(self) -> Path:
        from torch.utils.cpp_extension import _get_build_directory
        return Path(_get_build_directory(self.name, verbose=False))

    def jit_cached(self) -> bool:
        """A JIT build of this op is on disk (it may still be rebuilt if the sources changed)."""
        return any(self.jit_build_dir().glob(f"{self.name}*.so"))

    def jit_build_needed(self) -> bool:
        """A JIT load would compile: no build on disk, or a source newer than it (flag changes, which
        also trigger a rebuild, are not seen here)."""
        sos = list(self.jit_build_dir().glob(f"{self.name}*.so"))
        if not sos:
            return True
        built = max(p.stat().st_mtime for p in sos)
        return any(os.path.getmtime(s) > built for s in self.sources())

    def will_compile(self) -> bool:
        """``load()`` would compile: not loaded in this process, not prebuilt, and no up-to-date JIT
        build on disk (``jit_build_needed``)."""
        if self.name in OpBuilder._loaded_ops:
            return False
        if self.prebuilt_module() is not None:
            return False
        try:
            return self.jit_build_needed()
        except Exception:  # noqa: BLE001 - only decides whether a message is printed
            return True

    def arch_description(self) -> str:
        """What a build targets, for the start-up message."""
        return ""


_NATIVE_FLAGS: Optional[List[str]] = None  # CommCPUBuilder.native_flags, once per process


class CommCPUBuilder(_DsExtOp, CPUOpBuilder):
    NAME = "ds_ext_comm_cpu"
    BUILD_VAR = "DS_BUILD_DS_EXT_COMM_CPU"
    DEVICE = "cpu"
    SOURCES = ("cpu/comm_kernels.cpp",)

    def cxx_args(self):
        args = ["-O3", "-fopenmp", "-Wno-reorder"]
        # -march=native only for a JIT build (it runs where it was built); a prebuilt wheel stays portable
        if self.jit_mode:
            args += self.native_flags()
        return args + extra_flags("DS_EXT_CXX_FLAGS")

    def native_flags(self) -> List[str]:
        """DeepSpeed's ``cpu_arch()`` and ``simd_width()`` flags, asked once per process (each runs py-cpuinfo,
        about a second)."""
        global _NATIVE_FLAGS
        if _NATIVE_FLAGS is None:
            _NATIVE_FLAGS = [a for a in (self.cpu_arch(), self.simd_width()) if a]
        return list(_NATIVE_FLAGS)

    def before_build(self) -> None:
        self.native_flags()

    def arch_description(self) -> str:
        import platform
        return f"{platform.machine() or 'cpu'}, -march=native"

    def extra_ldflags(self):
        return ["-fopenmp"]


def normalize_arch_list(value: Optional[str]) -> Optional[str]:
    """``TORCH_CUDA_ARCH_LIST`` in a form DeepSpeed's parser accepts: ``"9.0a;8.0 sm_86 9.0+PTX"`` ->
    ``"8.0;8.6;9.0+PTX"`` (arch suffixes a/f dropped, ``sm_XY`` spelled ``X.Y``, duplicates merged with
    ``+PTX`` kept, order by version). None / empty stays as is."""
    if value is None or not value.strip():
        return value
    archs = {}
    for tok in re.split(r"[;\s,]+", value.strip()):
        if not tok:
            continue
        ptx = tok.upper().endswith("+PTX")
        base = tok[:-4] if ptx else tok
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d+))?([a-zA-Z]*)", base.strip())
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {tok!r} is not a compute capability (e.g. 8.0, 9.0a, 9.0+PTX)")
        if m.group(2) is not None:
            major, minor = int(m.group(1)), int(m.group(2))
        else:  # sm_90 / 90
            major, minor = divmod(int(m.group(1)), 10)
        archs[(major, minor)] = archs.get((major, minor), False) or ptx
    return ";".join(f"{a}.{b}{'+PTX' if p else ''}" for (a, b), p in sorted(archs.items()))


def prebuilt_arch_list(value: Optional[str]) -> str:
    """The arch list of a prebuilt CUDA op: ``value`` normalised (``normalize_arch_list``), or
    ``PREBUILT_ARCH_LIST`` (``8.0;9.0+PTX``) when unset or empty; ``+PTX`` is added to the highest arch
    when no entry carries it (as DeepSpeed does for JIT builds), so a prebuilt module always embeds PTX
    and runs on GPUs newer than its machine code."""
    archs = normalize_arch_list(value)
    if not archs:
        archs = PREBUILT_ARCH_LIST
    if "+PTX" not in archs:
        archs += "+PTX"
    return archs


class CommCUDABuilder(_DsExtOp, CUDAOpBuilder):
    NAME = "ds_ext_comm_cuda"
    BUILD_VAR = "DS_BUILD_DS_EXT_COMM_CUDA"
    DEVICE = "cuda"
    SOURCES = ("cuda/comm_kernels.cu", "cuda/bindings.cpp")

    def problems(self) -> List[str]:
        out = super().problems()
        if torch.version.cuda is None:
            out.append(f"torch {torch.__version__} is not a CUDA build")
            return out
        try:
            installed_cuda_version(self.NAME)
        except Exception as e:  # MissingCUDAException: no CUDA_HOME / nvcc
            out.append(f"no CUDA toolkit: {e}")
        return out

    def compute_capability_args(self, cross_compile_archs=None):
        raw = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not self.jit_mode:  # prebuilt: the default list, and PTX always (see prebuilt_arch_list)
            os.environ["TORCH_CUDA_ARCH_LIST"] = prebuilt_arch_list(raw)
        elif raw is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = normalize_arch_list(raw)
        if getattr(self, "_jit_arch_list", None):
            self._jit_arch_list = normalize_arch_list(self._jit_arch_list)
        return super().compute_capability_args(cross_compile_archs)

    def nvcc_args(self):
        args = super().nvcc_args()
        # the kernels compare in fp32 exactly as the CPU path: no --use_fast_math
        args = [a for a in args if a != "--use_fast_math"]
        return args + (extra_flags("DS_EXT_NVCC_FLAGS") if args else [])

    def cxx_args(self):
        return super().cxx_args() + extra_flags("DS_EXT_CXX_FLAGS")

    def arch_description(self) -> str:
        """The JIT build's targets: TORCH_CUDA_ARCH_LIST, else the visible GPUs (DeepSpeed's rule), with
        PTX for the highest."""
        raw = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if raw and raw.strip():
            archs = normalize_arch_list(raw)
        else:
            try:
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                archs = ";".join(f"{a}.{b}" for a, b in caps)
            except Exception:  # noqa: BLE001 - only a message
                archs = ""
        if archs and "+PTX" not in archs:
            archs += "+PTX"
        return f"TORCH_CUDA_ARCH_LIST={archs or '?'}"


BUILDERS = {"cpu": CommCPUBuilder, "cuda": CommCUDABuilder}


def install_ext_modules(env=None) -> list:
    """Extensions for ``setup.py`` (``ext_modules=``), DeepSpeed's convention: an op whose own
    ``DS_BUILD_*`` variable is 1 must build (an incompatible one aborts the install with the reason);
    ``DS_BUILD_OPS=1`` builds every op compatible here and skips the others with a warning naming why
    (so ``DS_BUILD_OPS=1`` works on a CPU-only machine: the CPU op is prebuilt, the CUDA one skipped)."""
    env = os.environ if env is None else env
    exts = []
    for cls in BUILDERS.values():
        b = cls()
        if not build_requested(b.BUILD_VAR, env):
            continue
        if not b.is_compatible(verbose=False):
            if env.get(b.BUILD_VAR, "").strip() not in ("", "0"):
                raise RuntimeError(f"{b.BUILD_VAR}=1 asked for {b.NAME}, which cannot be built here: {b.error_log}")
            print(f"[ds_ext setup] DS_BUILD_OPS: skipping {b.NAME} (not compatible here: {b.error_log})",
                  file=sys.stderr)
            continue
        if isinstance(b, CUDAOpBuilder):
            os.environ["TORCH_CUDA_ARCH_LIST"] = prebuilt_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        print(f"[ds_ext setup] prebuilding {b.NAME} ({b.BUILD_VAR if env.get(b.BUILD_VAR) else 'DS_BUILD_OPS'})",
              file=sys.stderr)
        exts.append(b.builder())
    return exts
