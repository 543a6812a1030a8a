"""Herding-bound simulation (the D-GraB seed's ``herding_bound_simulation.py`` experiment).

    python -m benchmarks.herding --d 1000 --m 10000 --n 100 [--trials 5] [--rounds 15]
                                   [--project-dim 64] [--out runs/herding]

Random unit vectors z (``m*n`` rows of dimension ``d``, row-normalised, reshaped ``(m, n, d)`` and
centred per worker: the mean over m is subtracted), then ``rounds`` reorder rounds of each method;
the metric after every round is the parallel herding bound
``max_k || sum_{t<=k} sum_j z_{pi_j(t), j} ||_inf`` (for the centralised methods, which order all
``m*n`` vectors as one sequence, the reference's ``max_k || sum_{i<=k} z_{pi(i)} ||_inf``).

Methods (as the reference): C-B (centralised GraB Balance: each vector signed against one running
sum, "+" to the front, "-" to the back in reverse), C-PB (centralised PairBalance), D-GraB (PairBalance
over workers 0..n-1 with one shared running sum), I-B and I-PB (each worker on its own), plus D-RR (a
fresh random permutation per worker every round, the baseline; not in the reference script) and, with
``--project-dim k``, D-GraB balancing CountSketch-projected vectors (the ``project_dim`` deviation of
``ds_ext.order.dgrab``; the bound is still measured on the full vectors).

Differences from the reference script, none changing what is measured: vectors are float32 (the
running sums float64) and drawn in chunks with ``numpy.random.default_rng(trial)`` (the reference
draws ``RandomState(trial).randn(mn, d)`` in float64: 8 GB for the README size); orders are index
tables instead of moved copies of the data; the bound of each round is computed in the same pass as
the next balancing. The sequential loops are numba-compiled (``nogil``), and methods run on two
threads. Prints a table (mean over trials per round) and the time taken; writes ``herding.csv`` and,
when matplotlib is importable, ``herding.png``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import numba

    njit = numba.njit(nogil=True, cache=True, fastmath=True)  # fastmath: SIMD reductions (dots, norms)
except ImportError:  # pragma: no cover - numba is a dependency; pure Python is far too slow at full size
    numba = None

    def njit(f):
        return f


@njit
def _linf(v):
    b = 0.0
    for k in range(v.shape[0]):
        a = abs(v[k])
        if a > b:
            b = a
    return b


@njit
def parallel_bound(z, perm):
    """z: (m, n, d); perm: (n, m) worker j visits example perm[j, t] at position t."""
    m, n, d = z.shape
    acc = np.zeros(d)
    best = 0.0
    for t in range(m):
        for j in range(n):
            row = z[perm[j, t], j]
            for k in range(d):
                acc[k] += row[k]
        b = _linf(acc)
        if b > best:
            best = b
    return best


@njit
def pair_round(z, zb, perm, shared):
    """PairBalance round for all workers (D-GraB when ``shared``, I-PB otherwise), balancing on
    ``zb`` (z itself or a projection of it). Returns (bound of ``perm`` on z, next perm)."""
    m, n, d = z.shape
    kb = zb.shape[2]
    acc = np.zeros(d)
    accb = np.zeros(d)
    sums = np.zeros((1 if shared else n, kb))
    nxt = np.empty_like(perm)
    best = 0.0
    left, right = 0, m - 1
    for p in range(m // 2):
        accb[:] = 0.0
        for j in range(n):
            a, b = perm[j, 2 * p], perm[j, 2 * p + 1]
            ra, rb = z[a, j], z[b, j]
            for k in range(d):
                acc[k] += ra[k]
                accb[k] += rb[k]
            s = sums[0] if shared else sums[j]
            va, vb = zb[a, j], zb[b, j]
            dot = 0.0
            for k in range(kb):
                dot += s[k] * (va[k] - vb[k])
            if dot <= 0:
                nxt[j, left], nxt[j, right] = a, b
                for k in range(kb):
                    s[k] += va[k] - vb[k]
            else:
                nxt[j, right], nxt[j, left] = a, b
                for k in range(kb):
                    s[k] -= va[k] - vb[k]
        bb = _linf(acc)
        if bb > best:
            best = bb
        for k in range(d):
            acc[k] += accb[k]
        bb = _linf(acc)
        if bb > best:
            best = bb
        left += 1
        right -= 1
    return best, nxt


@njit
def balance_round(z, perm):
    """I-B: every worker signs each vector against its own running sum; '+' to the front in visit
    order, '-' to the back in reverse visit order (the reference's ``sign_reorder``)."""
    m, n, d = z.shape
    acc = np.zeros(d)
    sums = np.zeros((n, d))
    nxt = np.empty_like(perm)
    front = np.zeros(n, np.int64)
    back = np.full(n, m - 1, np.int64)
    best = 0.0
    for t in range(m):
        for j in range(n):
            e = perm[j, t]
            r = z[e, j]
            s = sums[j]
            dot = 0.0
            for k in range(d):
                acc[k] += r[k]
                dot += s[k] * r[k]
            if dot <= 0:
                nxt[j, front[j]] = e
                front[j] += 1
                for k in range(d):
                    s[k] += r[k]
            else:
                nxt[j, back[j]] = e
                back[j] -= 1
                for k in range(d):
                    s[k] -= r[k]
        b = _linf(acc)
        if b > best:
            best = b
    return best, nxt


@njit
def central_round(z2, perm, pairs):
    """C-PB (``pairs``) or C-B on one sequence of all m*n vectors (z2: (mn, d), perm: (mn,))."""
    N, d = z2.shape
    acc = np.zeros(d)
    s = np.zeros(d)
    nxt = np.empty_like(perm)
    best = 0.0
    if pairs:
        left, right = 0, N - 1
        for p in range(N // 2):
            a, b = perm[2 * p], perm[2 * p + 1]
            ra, rb = z2[a], z2[b]
            dot = 0.0
            ba = 0.0
            bb = 0.0
            for k in range(d):  # one fused pass: both prefix sums' inf-norms and the sign test
                x = acc[k] + ra[k]
                y = x + rb[k]
                acc[k] = y
                ba = max(ba, abs(x))
                bb = max(bb, abs(y))
                dot += s[k] * (ra[k] - rb[k])
            best = max(best, max(ba, bb))
            if dot <= 0:
                nxt[left], nxt[right] = a, b
                for k in range(d):
                    s[k] += ra[k] - rb[k]
            else:
                nxt[right], nxt[left] = a, b
                for k in range(d):
                    s[k] -= ra[k] - rb[k]
            left += 1
            right -= 1
    else:
        front, back = 0, N - 1
        for t in range(N):
            e = perm[t]
            r = z2[e]
            dot = 0.0
            bb = 0.0
            for k in range(d):
                x = acc[k] + r[k]
                acc[k] = x
                bb = max(bb, abs(x))
                dot += s[k] * r[k]
            best = max(best, bb)
            if dot <= 0:
                nxt[front] = e
                front += 1
                for k in range(d):
                    s[k] += r[k]
            else:
                nxt[back] = e
                back -= 1
                for k in range(d):
                    s[k] -= r[k]
    return best, nxt


@njit
def central_bound(z2, perm):
    N, d = z2.shape
    acc = np.zeros(d)
    best = 0.0
    for t in range(N):
        r = z2[perm[t]]
        b = 0.0
        for k in range(d):
            x = acc[k] + r[k]
            acc[k] = x
            b = max(b, abs(x))
        best = max(best, b)
    return best


@njit
def _centre(z):
    m, n, d = z.shape
    mean = np.zeros((n, d))
    for t in range(m):
        for j in range(n):
            for k in range(d):
                mean[j, k] += z[t, j, k]
    mean /= m
    for t in range(m):
        for j in range(n):
            for k in range(d):
                z[t, j, k] -= mean[j, k]


@njit
def _sketch(z, bucket, sign, kdim):
    m, n, d = z.shape
    out = np.zeros((m, n, kdim), np.float32)
    for t in range(m):
        for j in range(n):
            for k in range(d):
                out[t, j, bucket[k]] += sign[k] * z[t, j, k]
    return out


def make_vectors(m: int, n: int, d: int, trial: int, chunk_rows: int = 1 << 16) -> np.ndarray:
    """Row-normalised standard normal vectors, (m, n, d) float32, centred per worker."""
    rng = np.random.default_rng(trial)
    z = np.empty((m * n, d), np.float32)
    for lo in range(0, m * n, chunk_rows):
        hi = min(lo + chunk_rows, m * n)
        x = rng.standard_normal((hi - lo, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        z[lo:hi] = x
    z = z.reshape(m, n, d)
    _centre(z)
    return z


def sketch(z: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(10_000 + seed)
    d = z.shape[2]
    return _sketch(z, rng.integers(0, k, d), (rng.integers(0, 2, d) * 2 - 1).astype(np.float32), k)


METHODS = ("C-B", "C-PB", "D-GraB", "I-B", "I-PB", "D-RR")


def run_method(name: str, z: np.ndarray, rounds: int, trial: int, zb=None) -> list:
    """Bounds after 0..rounds reorder rounds (index 0: the initial identity order)."""
    m, n, d = z.shape
    out = []
    if name in ("C-B", "C-PB"):
        z2 = z.reshape(m * n, d)
        perm = np.arange(m * n, dtype=np.int64)
        for _ in range(rounds):
            b, perm = central_round(z2, perm, name == "C-PB")
            out.append(b)
        out.append(central_bound(z2, perm))
        return out
    perm = np.tile(np.arange(m, dtype=np.int64), (n, 1))
    if name == "D-RR":
        rng = np.random.default_rng(20_000 + trial)
        out.append(parallel_bound(z, perm))
        for _ in range(rounds):
            perm = np.stack([rng.permutation(m) for _ in range(n)]).astype(np.int64)
            out.append(parallel_bound(z, perm))
        return out
    for _ in range(rounds):
        if name == "I-B":
            b, perm = balance_round(z, perm)
        else:  # D-GraB, I-PB, D-GraB k=..
            b, perm = pair_round(z, z if zb is None else zb, perm, name != "I-PB")
        out.append(b)
    out.append(parallel_bound(z, perm))
    return out


def simulate(m: int, n: int, d: int, rounds: int = 15, trials: int = 5, methods=METHODS, project_dim: int = 0,
             threads: int = 0, log=None) -> dict:
    """{method: array (trials, rounds + 1)} of herding bounds."""
    names = list(methods) + ([f"D-GraB k={project_dim}"] if project_dim else [])
    res = {k: [] for k in names}
    threads = threads or min(2, os.cpu_count() or 1)
    for trial in range(1, trials + 1):
        t0 = time.perf_counter()
        z = make_vectors(m, n, d, trial)
        zb = sketch(z, project_dim, trial) if project_dim else None
        with ThreadPoolExecutor(threads) as ex:
            futs = {k: ex.submit(run_method, "D-GraB" if k.startswith("D-GraB k=") else k, z, rounds, trial,
                                 zb if k.startswith("D-GraB k=") else None) for k in names}
            for k in names:
                res[k].append(futs[k].result())
        del z, zb
        if log:
            log(f"trial {trial}/{trials}: {time.perf_counter() - t0:.1f} s")
    return {k: np.array(v) for k, v in res.items()}


def format_table(res: dict, rounds_to_show=None) -> str:
    R = next(iter(res.values())).shape[1]
    cols = rounds_to_show or sorted({0, 1, 2, 3, 5, 10, R - 1} & set(range(R)))
    head = f"{'method':<14}" + "".join(f"{'r=' + str(c):>10}" for c in cols)
    lines = [head]
    for k, v in res.items():
        mu = v.mean(0)
        lines.append(f"{k:<14}" + "".join(f"{mu[c]:>10.3f}" for c in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.herding", description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--m", type=int, required=True, help="examples per worker (even)")
    ap.add_argument("--n", type=int, required=True, help="workers")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rounds", "--round", type=int, default=15)
    ap.add_argument("--project-dim", type=int, default=0, help="also run D-GraB on a CountSketch to k dims")
    ap.add_argument("--threads", type=int, default=0, help="methods run concurrently (default min(2, cores))")
    ap.add_argument("--out", default="runs/herding", help="folder for herding.csv / herding.png")
    a = ap.parse_args(argv)
    if a.m % 2:
        print(f"--m must be even (PairBalance pairs examples), got {a.m}", file=sys.stderr)
        return 2
    gib = a.m * a.n * a.d * 4 / 2**30
    print(f"herding simulation: m={a.m} n={a.n} d={a.d}, {a.trials} trials x {a.rounds} rounds; "
          f"vectors {gib:.2f} GiB float32", flush=True)
    t0 = time.perf_counter()
    res = simulate(a.m, a.n, a.d, a.rounds, a.trials, project_dim=a.project_dim, threads=a.threads,
                   log=lambda s: print(s, flush=True))
    took = time.perf_counter() - t0
    print(f"parallel herding bound, mean over {a.trials} trials (r = reorder rounds done):")
    print(format_table(res))
    drr = res["D-RR"].mean(0)[-1] if "D-RR" in res else float("nan")
    if "D-GraB" in res:
        print(f"D-GraB / D-RR after {a.rounds} rounds: {res['D-GraB'].mean(0)[-1] / drr:.3f}")
    os.makedirs(a.out, exist_ok=True)
    csv = os.path.join(a.out, "herding.csv")
    with open(csv, "w") as f:
        f.write("method,trial," + ",".join(f"r{r}" for r in range(a.rounds + 1)) + "\n")
        for k, v in res.items():
            for t, row in enumerate(v, 1):
                f.write(f"{k},{t}," + ",".join(f"{x:.6g}" for x in row) + "\n")
    print(f"wrote {csv}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no PNG (pip install 'ds_ext[bench]'); the CSV has the numbers")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, v in res.items():
            mu, sd = v.mean(0), v.std(0)
            x = np.arange(len(mu))
            ax.plot(x, mu, marker="o", ms=3, label=k)
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("reorder round")
        ax.set_ylabel("parallel herding bound (inf-norm)")
        ax.set_title(f"m={a.m}, n={a.n}, d={a.d}, {a.trials} trials")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = os.path.join(a.out, "herding.png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    print(f"time taken: {took:.1f} s ({math.floor(took / 60)} min {took % 60:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
