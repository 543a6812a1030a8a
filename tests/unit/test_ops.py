"""Compiled kernels (ds_ext/csrc via ds_ext/op_builder) against their torch references (ds_ext/ops.py).

The CPU op is JIT-built once per session (module fixture ``cpu_op``; ~40-60 s on 2 cores the first
time, ~1 s when the build cache is warm); if it cannot be built, every compiled-path test skips with
the reason. CUDA cases run only with a GPU (and a CUDA toolkit); they skip otherwise.
Each check runs the same call with ``DS_EXT_OPS=compiled`` and ``DS_EXT_OPS=torch`` and compares:
exactly (indices, bits, values), except ``sign_pack``'s fp64-accumulated scale (``rtol=1e-6``) and
CUDA ``scatter_add_`` with repeated indices (atomics; ``rtol=1e-6``). Within one path, the segmented
sign ops equal a loop of the per-tensor ones bit for bit, and ``threshold_select`` with a given count
equals it without one. On a GPU the same checks run on CUDA (``dev`` fixture), plus
``test_cuda_no_host_sync`` (torch's sync debug mode set to error around every sync-free call).
"""
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_ext import ops
from ds_ext.op_builder import (
    BUILDERS, CHECKOUT_TAG, CommCPUBuilder, CommCUDABuilder, build_requested, install_ext_modules,
    normalize_arch_list, prebuilt_arch_list)

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 63, 64, 65, 4097, 100003]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@contextlib.contextmanager
def mode(m):
    old = os.environ.get(ops.ENV)
    os.environ[ops.ENV] = m
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ops.ENV, None)
        else:
            os.environ[ops.ENV] = old


def both(fn):
    with mode("compiled"):
        a = fn()
    with mode("torch"):
        b = fn()
    return a, b


@pytest.fixture(scope="module")
def cpu_op():
    b = CommCPUBuilder()
    if not b.is_compatible():
        pytest.skip(f"{b.NAME} cannot be built here: {b.error_log}")
    t = time.time()
    try:
        mod = b.load(verbose=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{b.NAME} failed to build: {e}")
    print(f"\n[test_ops] {b.NAME} loaded ({b.loaded_from}) in {time.time() - t:.1f} s")
    return mod


def _cuda_ok():
    if not torch.cuda.is_available():
        return "no CUDA device"
    b = CommCUDABuilder()
    return None if b.is_compatible() else b.error_log


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def dev(request, cpu_op):
    if request.param == "cuda":
        why = _cuda_ok()
        if why:
            pytest.skip(f"CUDA kernels: {why}")
        try:
            BUILDERS["cuda"]().load()
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"CUDA op failed to build on a machine with a GPU: {e}")
    return torch.device(request.param)


def _rand(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(dtype).to(device)


def _eq(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a.cpu(), b.cpu()) or torch.equal(a.cpu().isnan(), b.cpu().isnan()) and torch.equal(
        a.cpu().nan_to_num(), b.cpu().nan_to_num())


# ------------------------------------------------------------------------------- threshold_select
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ef", [False, True])
def test_threshold_select(dev, dtype, ef):
    for n in SIZES:
        x = _rand(n, dtype, dev, n)
        e = (_rand(n, torch.float32, dev, n + 1) * 0.5) if ef else None
        if n > 10:
            x[3] = float("nan")
        ranges = [(0, -1), (0, 0), (n, n), (n // 3, n - n // 5), (1 if n else 0, n)]
        for t in (0.0, 1.5, float("inf")):  # everything (but NaN), some, nothing
            for st, en in ranges:
                a, b = both(lambda: ops.threshold_select(x, t, st, en, error=e))
                _eq(a[0], b[0])
                _eq(a[1], b[1])
                assert a[2] == b[2] == a[0].numel()
                if t == float("inf"):
                    assert a[2] == 0
                # the count on the device, then the selection sized from it: the same result
                ca, cb = both(lambda: ops.threshold_count(x, t, st, en, error=e))
                for c in (ca, cb):
                    assert c.dim() == 0 and c.dtype == torch.int64 and c.device == x.device
                assert int(ca) == int(cb) == a[2]
                ga, gb = both(lambda: ops.threshold_select(x, t, st, en, error=e, count=a[2]))
                for g in (ga, gb):
                    _eq(g[0], a[0])
                    _eq(g[1], a[1])
                    assert g[2] == a[2]
    # non-contiguous input, range cutting a 64-block
    big = _rand(2 * 5000, dtype, dev, 7)[::2]
    a, b = both(lambda: ops.threshold_select(big, 1.0, 37, 4001))
    _eq(a[0], b[0]), _eq(a[1], b[1])
    assert a[0].min() >= 37 and a[0].max() < 4001


def test_threshold_select_count_given_reads_nothing(cpu_op, monkeypatch):
    """With ``count`` the torch path is ``nonzero_static`` on every device: the blocked CPU ``nonzero``
    path (a host read on CUDA's twin) is never taken; a wrong count is an error in the CPU kernel."""
    x = _rand(200_003, torch.float32, "cpu", 5)
    with mode("torch"):
        ref = ops.threshold_select(x, 2.5, 11, 190_000)
    monkeypatch.setattr(ops, "_blocked_nonzero", lambda *a: pytest.fail("host-reading path taken"))
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("nonzero called"))
    for m in ("torch", "compiled"):
        with mode(m):
            got = ops.threshold_select(x, 2.5, 11, 190_000, count=ref[2])
        _eq(got[0], ref[0]), _eq(got[1], ref[1])
    with mode("compiled"), pytest.raises(RuntimeError, match="count"):
        ops.threshold_select(x, 2.5, 11, 190_000, count=ref[2] + 1)
    with pytest.raises(TypeError):
        ops.threshold_select(x, 2.5, count=torch.tensor(3))


def test_threshold_select_range_boundaries_exact(cpu_op):
    x = torch.zeros(200)
    x[[0, 63, 64, 127, 128, 199]] = 5.0
    with mode("compiled"):
        idx, vals, c = ops.threshold_select(x, 5.0, 63, 128)
    assert idx.tolist() == [63, 64, 127] and c == 3 and vals.tolist() == [5.0] * 3
    with mode("compiled"):
        idx, _, _ = ops.threshold_select(x, 5.0, 64, 199)
    assert idx.tolist() == [64, 127, 128]


# ------------------------------------------------------------------------------------ scatter_add_
@pytest.mark.parametrize("dense_dtype", DTYPES)
@pytest.mark.parametrize("val_dtype", DTYPES)
def test_scatter_add_and_fused_zero(dev, dense_dtype, val_dtype):
    for n, k in [(1, 0), (1, 5), (100, 300), (100003, 2000)]:
        g = torch.Generator().manual_seed(n + k)
        idx = torch.randint(0, n, (k,), generator=g).to(dev)  # repeated indices
        vals = _rand(k, val_dtype, dev, k)
        dense0 = _rand(n, dense_dtype, dev, 3)
        err0 = _rand(n, torch.float32, dev, 4)

        def run():
            d, e = dense0.clone(), err0.clone()
            ops.scatter_add_(d, idx, vals, zero_in=e)
            return d, e

        (da, ea), (db, eb) = both(run)
        if dev.type == "cuda":
            torch.testing.assert_close(da.float(), db.float(), rtol=1e-6 if dense_dtype == torch.float32 else 1e-2,
                                       atol=1e-6)
        else:
            _eq(da, db)
        _eq(ea, eb)
        assert (ea[idx] == 0).all() if k else True
    if dev.type == "cpu":  # CUDA: a device-side assert, which poisons the process (test_cuda_index_assert)
        with pytest.raises((RuntimeError, IndexError)):
            with mode("compiled"):
                ops.scatter_add_(torch.zeros(4, device=dev), torch.tensor([4], device=dev), torch.ones(1, device=dev))


# ------------------------------------------------------------------------------------------- signs
@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_pack_unpack(dev, dtype):
    for n in [0, 1, 7, 8, 9, 31, 33, 100003]:
        x = _rand(n, dtype, dev, n)
        if n >= 9:
            x[0], x[1], x[2] = 0.0, -0.0, float("-inf")
        res0 = torch.full((n,), 7.0, device=dev)

        def run():
            r = res0.clone()
            p, s = ops.sign_pack(x, residual=r)
            return p, s, r

        (pa, sa, ra), (pb, sb, rb) = both(run)
        _eq(pa, pb)
        assert pa.numel() == (n + 7) // 8
        torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0)
        if n and torch.isfinite(x).all():
            torch.testing.assert_close(ra, rb, rtol=1e-6, atol=1e-6 * float(sb))
        for acc in (False, True):
            base = _rand(n, torch.float32, dev, 9).to(dtype)

            def un():
                out = base.clone()
                return ops.sign_unpack(pa, sb, n, out=out, accumulate=acc)

            ua, ub = both(un)
            _eq(ua, ub)

            def un_t():  # the 0-d scale tensor, used on the device (no host read)
                out = base.clone()
                return ops.sign_unpack(pa, sa, n, out=out, accumulate=acc)

            uta, utb = both(un_t)
            _eq(uta, utb)
            with mode("compiled"):
                _eq(uta, ops.sign_unpack(pa, float(sa), n, out=base.clone(), accumulate=acc))
        if 0 < n and torch.isfinite(x).all():
            signs = torch.where(x.float() >= 0, 1.0, -1.0)
            with mode("compiled"):
                u = ops.sign_unpack(pa, sa, n)
            torch.testing.assert_close(u, signs * sa)


def test_sign_pack_inplace_residual_and_bit_order(cpu_op):
    x = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, -0.0, 5.0, -6.0, 7.0])
    for m in ("compiled", "torch"):
        with mode(m):
            y = x.clone()
            p, s = ops.sign_pack(y, residual=y)  # aliasing: EF-SignSGD's e <- p - delta
        assert p.tolist() == [0b01110101, 1] and abs(float(s) - 28 / 9) < 1e-6
        torch.testing.assert_close(y, x - torch.where(x >= 0, s, -s))


# --------------------------------------------------------------------------- segmented sign compression
SEG_LENGTHS = [0, 1, 7, 8, 9, 64, 0, 33, 1000, 5, 100003, 3]


def _segments(dev, dtype, lengths=SEG_LENGTHS, lead=3, tail=4):
    offs = [lead]
    for m in lengths:
        offs.append(offs[-1] + m)
    x = _rand(offs[-1] + tail, dtype, dev, len(lengths))
    x[offs[1]] = -0.0
    x[offs[3]] = 0.0
    return x, offs


def _pack_loop(x, offs, residual):
    ps, ss = [], []
    for a, b in zip(offs, offs[1:]):
        p, s = ops.sign_pack(x[a:b], residual=None if residual is None else residual[a:b])
        ps.append(p)
        ss.append(s)
    return torch.cat(ps), torch.stack(ss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_pack_segments_equals_loop(dev, dtype):
    x, offs = _segments(dev, dtype)
    res0 = torch.full((x.numel(),), 7.0, device=dev)
    out = {}
    for m in ("compiled", "torch"):
        with mode(m):
            r1, r2 = res0.clone(), res0.clone()
            p1, s1 = ops.sign_pack_segments(x, offs, residual=r1)
            p2, s2 = _pack_loop(x, offs, r2)
            _eq(p1, p2)  # bit for bit, scales included, on each path
            _eq(s1, s2)
            _eq(r1, r2)
            assert r1[:offs[0]].eq(7).all() and r1[offs[-1]:].eq(7).all()  # outside the segments: untouched
            assert p1.numel() == sum((b - a + 7) // 8 for a, b in zip(offs, offs[1:]))
            assert s1.dtype == torch.float32 and s1.shape == (len(offs) - 1,) and s1.device == x.device
            if dtype == torch.float32:  # the residual may be x itself
                y = x.clone()
                p3, s3 = ops.sign_pack_segments(y, offs, residual=y)
                _eq(p3, p1), _eq(s3, s1), _eq(y[offs[0]:offs[-1]], r1[offs[0]:offs[-1]])
            out[m] = (p1, s1, r1)
    (pa, sa, ra), (pb, sb, rb) = out["compiled"], out["torch"]
    _eq(pa, pb)
    torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0)  # the one-ulp rule between the paths
    torch.testing.assert_close(ra, rb, rtol=1e-6, atol=1e-6 * float(sb.max()))
    # unpack: segmented == loop of sign_unpack, on each path; the paths agree exactly for the same scales
    base = _rand(x.numel(), torch.float32, dev, 9).to(dtype)
    for acc in (False, True):
        got = {}
        for m in ("compiled", "torch"):
            with mode(m):
                o1 = ops.sign_unpack_segments(pa, sb, offs, base.clone(), accumulate=acc)
                o2 = base.clone()
                for t, (a, b) in enumerate(zip(offs, offs[1:])):
                    bo = sum((d - c + 7) // 8 for c, d in zip(offs[:t], offs[1:t + 1]))
                    ops.sign_unpack(pa[bo:bo + (b - a + 7) // 8], sb[t], b - a, out=o2[a:b], accumulate=acc)
                _eq(o1, o2)
                _eq(o1[:offs[0]], base[:offs[0]]), _eq(o1[offs[-1]:], base[offs[-1]:])
                got[m] = o1
        _eq(got["compiled"], got["torch"])


def test_sign_segments_edge_cases(cpu_op):
    x = torch.randn(40)
    for m in ("compiled", "torch"):
        with mode(m):
            p, s = ops.sign_pack_segments(x, [5])  # no segment
            assert p.numel() == 0 and s.numel() == 0
            p, s = ops.sign_pack_segments(x, [0, 0, 0])  # empty segments
            assert p.numel() == 0 and s.tolist() == [0.0, 0.0]
            out = torch.ones(40)
            ops.sign_unpack_segments(p, s, [0, 0, 0], out)
            assert out.eq(1).all()
            p, s = ops.sign_pack_segments(x, [0, 8, 16, 40])  # byte-aligned: one pass, no scatter
            _eq(p, _pack_loop(x, [0, 8, 16, 40], None)[0])
            for bad in ([3, 2], [0, 41], [-1, 3]):
                with pytest.raises(ValueError):
                    ops.sign_pack_segments(x, bad)
            with pytest.raises(TypeError):
                ops.sign_pack_segments(x, torch.tensor([0, 8]))
            with pytest.raises(ValueError):
                ops.sign_unpack_segments(p, s[:2], [0, 8, 16, 40], out)


# ------------------------------------------------------------------------------------ value packing
@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_pack_values(dev, src, dst):
    x = (_rand(70001, torch.float32, dev, 1) * 1e3)
    x[:6] = torch.tensor([65520.0, -1e6, 1e-8, float("nan"), float("inf"), 3e-39])  # fp16 overflow, subnormals
    x = x.to(src)
    idx = torch.randint(0, x.numel(), (5003,), generator=torch.Generator().manual_seed(2)).to(dev)
    for ix in (None, idx):
        a, b = both(lambda: ops.pack_values(x, dst, indices=ix))
        _eq(a, b)
        ua, ub = both(lambda: ops.unpack_values(a))
        _eq(ua, ub)
        assert ua.dtype == torch.float32


# ------------------------------------------------------------------------------------- the reducers
def _drive(name, opts, steps=4, n=70_001, seed=0):
    from ds_ext.registry import REDUCERS, load_builtin
    load_builtin()
    torch.manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(37, 11)),
          torch.nn.Parameter(torch.zeros(5))]
    red = REDUCERS.build(name, opts, [(f"p{i}", p) for i, p in enumerate(ps)])
    out = []
    for s in range(steps):
        for p in ps:
            p.grad = torch.randn_like(p) * (1 + s)
        red.finish()
        out.append([p.grad.clone() for p in ps])
    return out, red.state_dict()


@pytest.mark.parametrize("name,opts", [
    ("exdyna", {"density": 0.01}), ("topk", {"density": 0.01}), ("signsgd", {}),
    ("signsgd", {"scale": "global"}), ("signsgd", {"error_feedback": False})])
def test_reducers_same_with_kernels_and_fallback(cpu_op, name, opts):
    (ga, sa), (gb, sb) = both(lambda: _drive(name, opts))
    tol = dict(rtol=1e-5, atol=1e-6) if name == "signsgd" else dict(rtol=0, atol=0)  # the scale: one ulp
    for step_a, step_b in zip(ga, gb):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, **tol)
    if sa.get("error") is not None:
        torch.testing.assert_close(sa["error"], sb["error"], **tol)
    for k in ("threshold", "k_prev", "ks_prev", "part", "pos"):
        assert sa.get(k) == sb.get(k)


def _signsgd_rank(comm):
    """One loopback rank of signsgd: 3 steps of random gradients (seeded per rank), what it applied and
    the error-feedback residual. ``DS_EXT_OPS`` is set by the caller, for all ranks at once."""
    from ds_ext.registry import REDUCERS, load_builtin
    load_builtin()
    g = torch.Generator().manual_seed(100 + comm.rank)
    p = torch.nn.Parameter(torch.zeros(10_007))
    q = torch.nn.Parameter(torch.zeros(3, 5))
    red = REDUCERS.build("signsgd", {}, [("p", p), ("q", q)], comm=comm)
    grads = []
    for s in range(3):
        p.grad, q.grad = torch.randn(p.shape, generator=g), torch.randn(q.shape, generator=g)
        red.finish()
        grads.append(torch.cat([p.grad.reshape(-1), q.grad.reshape(-1)]).clone())
    return grads, red.error.clone()  # the error-feedback residual


def test_signsgd_two_ranks_agree(cpu_op, monkeypatch):
    from ds_ext.testing import LoopbackWorld
    r0, r1 = {}, {}
    for m in ("compiled", "torch"):
        monkeypatch.setenv(ops.ENV, m)
        r0[m], r1[m] = LoopbackWorld(2).run(_signsgd_rank)
    for m in ("compiled", "torch"):
        for a, b in zip(r0[m][0], r1[m][0]):
            assert torch.equal(a, b)  # every rank applies the same gradient
    for r in (r0, r1):
        for a, b in zip(r["compiled"][0], r["torch"][0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["compiled"][1], r["torch"][1], rtol=1e-5, atol=1e-6)
    # error feedback: the residual is what was not applied; 1 bit + scale per tensor per rank
    assert not torch.equal(r0["compiled"][1], r1["compiled"][1])


# --------------------------------------------------------------------------- builders and loading
def test_builders_names_sources_compat():
    for cls in BUILDERS.values():
        b = cls()
        assert b.NAME.startswith("ds_ext_") and b.absolute_name() == f"ds_ext.op_builder.{b.NAME}"
        assert all(os.path.isabs(s) and os.path.exists(s) for s in b.sources())
        ok = b.is_compatible()
        assert ok or b.error_log  # an incompatible op says why
    cb = CommCUDABuilder()
    if torch.version.cuda is None:
        assert not cb.is_compatible() and "not a CUDA build" in cb.error_log


def test_build_requested_convention():
    assert not build_requested("DS_BUILD_DS_EXT_COMM_CPU", {})
    assert build_requested("DS_BUILD_DS_EXT_COMM_CPU", {"DS_BUILD_OPS": "1"})
    assert not build_requested("DS_BUILD_DS_EXT_COMM_CPU", {"DS_BUILD_OPS": "1", "DS_BUILD_DS_EXT_COMM_CPU": "0"})
    assert build_requested("DS_BUILD_DS_EXT_COMM_CPU", {"DS_BUILD_DS_EXT_COMM_CPU": "1"})


def test_install_ext_modules(monkeypatch):
    env = {"DS_BUILD_DS_EXT_COMM_CPU": "1"}
    exts = install_ext_modules(env)
    assert [e.name for e in exts] == ["ds_ext.op_builder.ds_ext_comm_cpu"]
    assert all(os.path.isabs(s) for s in exts[0].sources)
    assert "-march=native" not in " ".join(exts[0].extra_compile_args["cxx"])  # portable prebuilt
    if torch.version.cuda is None:  # DS_BUILD_OPS=1: every compatible op, the others skipped with a reason
        assert [e.name for e in install_ext_modules({"DS_BUILD_OPS": "1"})] == ["ds_ext.op_builder.ds_ext_comm_cpu"]
        with pytest.raises(RuntimeError, match="DS_BUILD_DS_EXT_COMM_CUDA=1 asked for ds_ext_comm_cuda, which cannot "
                                               "be built here"):
            install_ext_modules({"DS_BUILD_DS_EXT_COMM_CUDA": "1"})
    assert install_ext_modules({}) == []


@pytest.mark.slow  # a real C++ build through setup.py (~1 min on 2 idle cores)
def test_setup_py_prebuilds_the_cpu_op(tmp_path):
    """``DS_BUILD_DS_EXT_COMM_CPU=1 python setup.py build_ext``: the module the install would ship
    imports, was built against this torch, and computes what the torch reference computes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DS_BUILD_DS_EXT_COMM_CPU="1")
    p = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "tmp")], cwd=root, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    so = list((tmp_path / "lib" / "ds_ext" / "op_builder").glob("ds_ext_comm_cpu*.so"))
    assert len(so) == 1
    import importlib.util

    spec = importlib.util.spec_from_file_location("ds_ext_comm_cpu", so[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert int(mod.torch_version()) == int(torch.__version__.split(".")[0]) * 100 + int(torch.__version__.split(".")[1])
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(0))
    idx = (x.abs() >= 1.5).nonzero().flatten()  # the torch reference
    got = mod.threshold_select(x, None, 1.5, 0, x.numel())
    assert idx.numel() > 100 and torch.equal(got[0].long(), idx) and torch.equal(got[1], x[idx])


def test_prebuilt_module_is_preferred(cpu_op, tmp_path, monkeypatch):
    from deepspeed.ops.op_builder.builder import OpBuilder
    so = Path(cpu_op.__file__)
    pkg = tmp_path / "fake_prebuilt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(so, pkg / so.name)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the JIT module's init function carries its JIT name (ds_ext_comm_cpu_<checkout tag>), so the copy is
    # looked up under that name; a real prebuilt module is ds_ext.op_builder.ds_ext_comm_cpu (setup.py test)
    monkeypatch.setattr(CommCPUBuilder, "absolute_name", lambda self: f"fake_prebuilt.{self.name}")
    monkeypatch.delitem(OpBuilder._loaded_ops, CommCPUBuilder().name, raising=False)
    b = CommCPUBuilder()
    mod = b.load()
    assert b.loaded_from == "prebuilt" and mod.__name__ == f"fake_prebuilt.{b.name}"
    monkeypatch.setattr(CommCPUBuilder, "absolute_name", lambda self: "fake_prebuilt.nothing_here")
    assert CommCPUBuilder().prebuilt_module() is None


def test_arch_list_normalised(monkeypatch):
    assert normalize_arch_list("9.0a") == "9.0"
    assert normalize_arch_list("8.0 9.0a;9.0+PTX sm_86") == "8.0;8.6;9.0+PTX"
    assert normalize_arch_list("10.0f;12.0a+PTX") == "10.0;12.0+PTX"
    assert normalize_arch_list(None) is None
    with pytest.raises(ValueError):
        normalize_arch_list("hopper")
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    with pytest.raises(ValueError):  # DeepSpeed's own parser: int('0a')
        CUDAOpBuilder.compute_capability_args(CommCUDABuilder())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    args = CommCUDABuilder().compute_capability_args()  # a prebuilt (non-JIT) build: PTX added for the highest
    assert args == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                    "-gencode=arch=compute_90,code=compute_90"]


def test_prebuilt_arch_list_carries_ptx(monkeypatch):
    assert prebuilt_arch_list(None) == prebuilt_arch_list("") == "8.0;9.0+PTX"
    assert prebuilt_arch_list("8.0;9.0") == "8.0;9.0+PTX"
    assert prebuilt_arch_list("9.0a;8.6") == "8.6;9.0+PTX"
    assert prebuilt_arch_list("8.0+PTX;9.0") == "8.0+PTX;9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # recorded, so that the builder's own setting is undone
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert CommCUDABuilder().compute_capability_args() == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]


def test_jit_build_cache_per_checkout(tmp_path):
    """The JIT extension name carries a hash of the package directory: another checkout's op_builder
    (same file, other path) names its build differently, so the two never rebuild over each other."""
    import importlib.util
    b = CommCPUBuilder()
    assert b.name == f"ds_ext_comm_cpu_{CHECKOUT_TAG}" and b.NAME == "ds_ext_comm_cpu"
    assert b.absolute_name() == "ds_ext.op_builder.ds_ext_comm_cpu"  # the prebuilt module keeps its name
    other = tmp_path / "ds_ext" / "op_builder"
    other.mkdir(parents=True)
    shutil.copy(ROOT / "ds_ext" / "op_builder" / "__init__.py", other / "__init__.py")
    spec = importlib.util.spec_from_file_location("other_checkout_op_builder", other / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.CHECKOUT_TAG != CHECKOUT_TAG and mod.CommCPUBuilder().name != b.name


def test_modes_and_single_message(cpu_op, monkeypatch, caplog):
    x = torch.randn(1000)
    with mode("bogus"), pytest.raises(ValueError):
        ops.threshold_select(x, 1.0)
    assert ops.status("cpu")["in_use"] == "compiled" or os.environ.get(ops.ENV) == "torch"
    # a failing load: one message naming the reason on the ds_ext.ops logger, then the torch code
    monkeypatch.setattr(ops, "_load", lambda dev: (None, "RuntimeError: simulated build failure"))
    ops._reset()
    try:
        with mode("auto"), caplog.at_level("WARNING", logger="ds_ext.ops"):
            r1 = ops.threshold_select(x, 1.0)
            ops.sign_pack(x)
            ops.kernels("cuda")  # a GPU host without its kernels: loud, with how to prebuild
            ops.kernels("cuda")
        recs = [r for r in caplog.records if r.name == "ds_ext.ops"]
        assert len(recs) == 2, [r.getMessage() for r in recs]
        assert recs[0].levelname == "WARNING" and "simulated build failure" in recs[0].getMessage()
        assert recs[1].levelname == "ERROR" and ops.PREBUILD_HINT in recs[1].getMessage()
        with mode("torch"):
            r2 = ops.threshold_select(x, 1.0)
        assert torch.equal(r1[0], r2[0])
        with mode("compiled"), pytest.raises(RuntimeError, match="simulated build failure"):
            ops.threshold_select(x, 1.0)
    finally:
        ops._reset()


def test_prepare_loads_up_front_and_says_so(cpu_op, monkeypatch, caplog):
    """``prepare`` loads the op before any call; when a build is due it logs one line first."""
    ops._reset()
    try:
        monkeypatch.setattr(CommCPUBuilder, "will_compile", lambda self: True)  # the module itself is cached
        with mode("auto"), caplog.at_level("WARNING", logger="ds_ext.ops"):
            st = ops.prepare(torch.device("cpu"))
            ops.prepare("cpu")
        assert st["in_use"] == "compiled" and st["seconds"] >= 0 and "cpu" in ops._loaded
        msgs = [r.getMessage() for r in caplog.records if r.name == "ds_ext.ops"]
        assert len(msgs) == 1 and msgs[0].startswith("compiling ds_ext's comm kernels for cpu (")
        assert "once, about" in msgs[0]
        with mode("torch"):
            assert ops.prepare("cpu")["in_use"] == "torch"
    finally:
        ops._reset()


def test_import_needs_no_compiler(tmp_path):
    """No compiler on PATH, an empty build cache: ds_ext imports and the ops fall back with one message."""
    code = ("import logging, torch\n"
            "import ds_ext, ds_ext.ops as ops, ds_ext.op_builder, ds_ext.reducers\n"
            "i, v, c = ops.threshold_select(torch.tensor([0.5, 2.0, -3.0]), 1.0)\n"
            "ops.sign_pack(torch.ones(3))\n"
            "assert i.tolist() == [1, 2], i\n")
    env = {**os.environ, "PATH": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": "no-such-cxx",
           "DS_ACCELERATOR": "cpu"}
    env.pop(ops.ENV, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    msgs = [ln for ln in r.stderr.splitlines() if "ds_ext.ops:" in ln]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0], r.stderr[-3000:]


def test_report(cpu_op, capsys):
    from ds_ext import report
    with mode("auto"):
        assert report.main(["--load"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("ds_ext_comm")}
    assert set(lines) == {"ds_ext_comm_cpu", "ds_ext_comm_cuda"}
    assert lines["ds_ext_comm_cpu"].split()[1:5] == ["yes", "no", "yes", "compiled"]
    for key in ("torch version", "torch CUDA", "deepspeed version", "DS_EXT_OPS", "TORCH_CUDA_ARCH_LIST"):
        assert key in out
    if not torch.cuda.is_available():
        assert "not a CUDA build" in out or "no cuda device" in out
    with mode("torch"):
        report.main([])
    assert "torch fallback" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ CUDA only
@needs_cuda
def test_cuda_no_host_sync(dev):
    """Every sync-free call, on both paths, under torch's sync debug mode set to error: a blocking copy,
    an ``.item()`` or a ``nonzero`` inside would raise."""
    if dev.type != "cuda":
        pytest.skip("the CUDA half of the dev fixture")
    x, offs = _segments(dev, torch.float32)
    e = torch.randn(x.numel(), device=dev)
    idx = torch.randint(0, x.numel(), (1000,), device=dev).unique()
    vals = torch.randn(idx.numel(), device=dev)
    for m in ("compiled", "torch"):
        with mode(m):
            n_hit = int(ops.threshold_count(x, 1.0, 5, x.numel() - 7, error=e))
            ops.sign_pack_segments(x, offs)  # warm the segment-plan cache outside the check as well
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                c = ops.threshold_count(x, 1.0, 5, x.numel() - 7, error=e)
                got = ops.threshold_select(x, 1.0, 5, x.numel() - 7, error=e, count=n_hit)
                r = x.clone()
                p, s = ops.sign_pack_segments(r, offs, residual=r)
                ops.sign_unpack_segments(p, s, offs, torch.zeros_like(x), accumulate=True)
                p1, s1 = ops.sign_pack(x)
                ops.sign_unpack(p1, s1, x.numel(), out=torch.empty_like(x))
                ops.scatter_add_(torch.zeros_like(x), idx, vals, zero_in=e.clone())
                ops.pack_values(x, torch.float16, indices=idx)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert int(c) == n_hit == got[2]


@needs_cuda
def test_cuda_device_checks(dev):
    if dev.type != "cuda":
        pytest.skip("the CUDA half of the dev fixture")
    d = torch.zeros(10, device=dev)
    with mode("compiled"):
        with pytest.raises(RuntimeError, match="indices is on cpu"):
            ops.scatter_add_(d, torch.tensor([1]), torch.ones(1, device=dev))
        with pytest.raises(RuntimeError, match="values is on cpu"):
            ops.scatter_add_(d, torch.tensor([1], device=dev), torch.ones(1))
        with pytest.raises(RuntimeError, match="zero_in is on cpu"):
            ops.scatter_add_(d, torch.tensor([1], device=dev), torch.ones(1, device=dev), zero_in=torch.zeros(10))
        with pytest.raises(RuntimeError, match="error is on cpu"):
            ops.threshold_select(d, 1.0, error=torch.zeros(10))
        with pytest.raises(RuntimeError, match="error is on cpu"):
            ops.threshold_count(d, 1.0, error=torch.zeros(10))


@needs_cuda
def test_cuda_index_assert(dev):
    """An out-of-range index is a device-side assert (no host read after every call): the process's CUDA
    context is lost, so this runs in a child process."""
    if dev.type != "cuda":
        pytest.skip("the CUDA half of the dev fixture")
    code = ("import torch, ds_ext.ops as ops\n"
            "d = torch.zeros(4, device='cuda')\n"
            "ops.scatter_add_(d, torch.tensor([4], device='cuda'), torch.ones(1, device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    env = {**os.environ, ops.ENV: "compiled"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "device-side assert" in r.stderr, r.stderr[-3000:]
