"""Seconds per kernel pass for each pass variant, side by side in one run, with the roofline.

Writes ``results/bench_pass.csv`` and its provenance sidecar ``results/bench_pass.json``.

Variants (Matern-3/2 ARD, float64 inputs and Krylov vectors, 11 columns as in a fused SLQ+CG
pass with 10 probes):

``float64``    the blocked pass as it was: row tiles against all columns (``symmetric=False``);
               for ``dense``, the dense backend (K built once, then K V).
``symmetric``  the blocked strip layout: each off-diagonal tile evaluated once, used both ways.
``mixed``      ``symmetric`` with the kernel entries in float32 (products and sums in float64).
``stored``     the stored backend (in the cases with ``dense``): K's noise-free part built once
               by row tiles, then K V; its VJP from the stored K and the ``symmetric`` tiles.

Per case and variant: ``fwd_s`` (one K V), ``vg_s`` (value and hyperparameter gradient: K V and
the VJP of <U, K V> with respect to the hyperparameters, which is what the trainer's backward pass
asks of the matvec), each the median of ``--reps`` calls after a compiling warm-up; for
``dense`` also ``build_s`` (K alone; ``fwd_s`` is then the product with the prebuilt K and
``vg_s`` the build, the product and the VJP through the build); for ``stored`` also ``build_s``,
with ``fwd_s`` the product with the prebuilt K and ``vg_s`` the build, the product and the VJP
(its hyperparameter part by the blocked tiles). Kernel pairs per second count
n^2 pairs per pass, the same for every variant, so they compare directly. ``err_fwd`` and
``err_grad`` are the relative errors against the ``float64`` variant of the same case.
The roofline rows: this machine's float64 GEMM rate and its memory bandwidth (a large copy),
measured in the same run.

    python scripts/bench_pass.py           # n = 14 940 (d = 18) and n = 36 000 (d = 8)
    python scripts/bench_pass.py --quick   # n = 3 000 and 6 000: a check that it runs
    python scripts/bench_pass.py --memory  # -> results/bench_memory_stored.csv

``--memory``: the peak resident memory of one SLQ value+gradient (the packaged default's
estimator: 10 probes, depth 15, rank-1000 random-pivot preconditioner, CG tolerance 1e-5) with
the stored backend, each in a fresh process, against ``matvec.stored_need_bytes``, the estimate
by which ``backend = "auto"`` decides whether K may be stored. Memory, unlike time, does not
depend on the machine's load.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _benchutil as bu  # noqa: E402

from gpadjoint import provenance  # noqa: E402
from gpadjoint.kernels import Hypers, dense_cov  # noqa: E402
from gpadjoint.matvec import make_backend, stored_cov, stored_need_bytes  # noqa: E402

KERNEL = "matern32"
COLS = 11
FIELDS = ["kind", "n", "d", "backend", "variant", "tile", "fwd_s", "vg_s", "build_s",
          "fwd_pairs_per_s", "vg_pairs_per_s", "vg_vs_float64", "err_fwd", "err_grad", "value",
          "unit", "reps"]
# (n, d, with the dense and stored rows): the second case leaves out the two that hold K (10 GB)
CASES = [(14940, 18, True), (36000, 8, False)]
CASES_QUICK = [(3000, 18, True), (6000, 8, False)]
VARIANTS = {"float64": dict(symmetric=False), "symmetric": dict(symmetric=True),
            "mixed": dict(symmetric=True, precision="mixed")}


def timed(fn, *args, reps):
    """Median seconds of ``reps`` calls of ``fn(*args)`` after one warm-up, and the last output."""
    out = jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def roofline(reps):
    """[GEMM GFLOP/s (float64, 4096^2), copy GB/s (1 GiB read + 1 GiB written)] rows."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((4096, 4096)))
    s, _ = timed(jax.jit(lambda a: a @ a), a, reps=reps)
    gemm = 2 * 4096**3 / s / 1e9
    src = np.ones(2**27)  # 1 GiB of float64
    dst = np.empty_like(src)
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    bw = 2 * src.nbytes / float(np.median(ts[1:])) / 1e9
    return [dict(kind="roofline", variant="gemm_float64", value=f"{gemm:.1f}", unit="GFLOP/s",
                 reps=reps),
            dict(kind="roofline", variant="copy_bandwidth", value=f"{bw:.1f}", unit="GB/s",
                 reps=reps)]


def problem(n, d):
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((n, d)))
    V = jnp.asarray(rng.standard_normal((n, COLS)))
    U = jnp.asarray(rng.standard_normal((n, COLS)))
    # lengthscales of the order of the inputs' spread, so the kernel is neither 0 nor 1
    h = Hypers(jnp.full((d,), 0.5 * np.sqrt(d)), jnp.asarray(1.3), jnp.asarray(0.05))
    return X, V, U, h


def rel(a, b):
    a, b = np.concatenate([np.ravel(x) for x in a]), np.concatenate([np.ravel(x) for x in b])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def blocked_case(n, d, tile, reps, refs=None):
    """Time the blocked variants -> rows.

    ``refs`` (a dict), if given, receives the float64 variant's output, hyperparameter cotangent
    and ``vg_s``, which :func:`stored_case` compares against.
    """
    X, V, U, h = problem(n, d)
    rows, ref = [], None
    for variant, kw in VARIANTS.items():
        be = make_backend("blocked", KERNEL, tile=tile, **kw)
        fwd = jax.jit(lambda V, h, be=be: be.matvec(X, V, h))

        def vg(V, h, be=be):
            out, vjp = jax.vjp(lambda h: be.matvec(X, V, h), h)
            return out, vjp(U)[0]

        tf, _ = timed(fwd, V, h, reps=reps)
        tg, (out, hbar) = timed(jax.jit(vg), V, h, reps=reps)
        if ref is None:
            ref = (out, hbar, tg)
            if refs is not None:
                refs.update(out=out, hbar=hbar, vg_s=tg)
        rows.append(dict(kind="pass", n=n, d=d, backend="blocked", variant=variant, tile=tile,
                         fwd_s=f"{tf:.4f}", vg_s=f"{tg:.4f}",
                         fwd_pairs_per_s=f"{n * n / tf:.3e}", vg_pairs_per_s=f"{n * n / tg:.3e}",
                         vg_vs_float64=f"{tg / ref[2]:.3f}", err_fwd=f"{rel([out], [ref[0]]):.1e}",
                         err_grad=f"{rel(hbar, ref[1]):.1e}", reps=reps))
        print(rows[-1], flush=True)
    return rows


def dense_case(n, d, reps):
    X, V, U, h = problem(n, d)
    build = jax.jit(lambda h: dense_cov(KERNEL, X, h))
    tb, K = timed(build, h, reps=reps)
    tf, _ = timed(jax.jit(lambda K, V: K @ V), K, V, reps=reps)
    del K

    def vg(V, h):
        out, vjp = jax.vjp(lambda h: dense_cov(KERNEL, X, h) @ V, h)
        return out, vjp(U)[0]

    tg, _ = timed(jax.jit(vg), V, h, reps=reps)
    row = dict(kind="pass", n=n, d=d, backend="dense", variant="float64", fwd_s=f"{tf:.4f}",
               vg_s=f"{tg:.4f}", build_s=f"{tb:.4f}", fwd_pairs_per_s=f"{n * n / tf:.3e}",
               vg_pairs_per_s=f"{n * n / tg:.3e}", reps=reps)
    print(row, flush=True)
    return [row]


def stored_case(n, d, tile, reps, refs):
    """Time the stored backend (build alone, K V with K prebuilt, value + gradient) -> rows."""
    X, V, U, h = problem(n, d)
    be = make_backend("stored", KERNEL, tile=tile)
    tb, K = timed(jax.jit(lambda h: stored_cov(KERNEL, tile, X, h)), h, reps=reps)
    mv = be.operator(X, h)[0]
    tf, _ = timed(jax.jit(lambda K, V, h: mv(V, K, X, h)), K, V, h, reps=reps)
    del K

    def vg(V, h):
        out, vjp = jax.vjp(lambda h: be.matvec(X, V, h), h)
        return out, vjp(U)[0]

    tg, (out, hbar) = timed(jax.jit(vg), V, h, reps=reps)
    row = dict(kind="pass", n=n, d=d, backend="stored", variant="float64", tile=tile,
               fwd_s=f"{tf:.4f}", vg_s=f"{tg:.4f}", build_s=f"{tb:.4f}",
               fwd_pairs_per_s=f"{n * n / tf:.3e}", vg_pairs_per_s=f"{n * n / tg:.3e}",
               vg_vs_float64=f"{tg / refs['vg_s']:.3f}",
               err_fwd=f"{rel([out], [refs['out']]):.1e}",
               err_grad=f"{rel(hbar, refs['hbar']):.1e}", reps=reps)
    print(row, flush=True)
    return [row]


MEMORY_CASES = [(8000, 20), (16000, 20), (24000, 20), (24000, 5)]
MEMORY_FIELDS = ["n", "d", "backend", "status", "peak_rss_gib", "estimate_gib", "K_gib",
                 "estimate_over_peak", "seconds", "cg_iterations", "passes", "child_wall_s",
                 "commit", "machine"]


def memory_child(spec):
    """One stored SLQ value+gradient at (n, d) -> a JSON line with the peak RSS."""
    from gpadjoint.kernels import unconstrain
    from gpadjoint.mll import neg_mll, precond_factors
    from gpadjoint.settings import MLLConfig

    n, d = spec["n"], spec["d"]
    X, _, _, h = problem(n, d)
    y = jnp.asarray(np.random.default_rng(1).standard_normal(n))
    cfg = MLLConfig(estimator="slq", num_probes=10, lanczos_depth=15, precond_rank=1000,
                    cg_tol=1e-5, cg_max_iter=1000, precond_pivot="random")
    p = unconstrain(h.lengthscale, h.outputscale, h.noise, 0.0, noise_floor=cfg.noise_floor,
                    dtype=jnp.float64)
    be = make_backend("stored", KERNEL)
    fac = precond_factors(X, KERNEL, h, cfg)

    def loss(p, X, y, fac):
        return neg_mll(p, X, y, jax.random.PRNGKey(0), backend=be, config=cfg, precond=fac)

    t0 = time.perf_counter()
    (v, aux), g = jax.block_until_ready(
        jax.jit(jax.value_and_grad(loss, has_aux=True))(p, X, y, fac))
    print(json.dumps(dict(seconds=round(time.perf_counter() - t0, 2),
                          cg_iterations=int(aux["cg_iterations"]),
                          passes=float(aux["passes"]), peak_rss_mib=bu.peak_rss_mib())))


def memory(out: Path):
    """Run the memory cases, one child each, and write ``out`` (one row per case)."""
    gib = 1024**3
    rows = []
    for n, d in MEMORY_CASES:
        res = bu.run_child(Path(__file__), dict(n=n, d=d), timeout=3600)
        est = stored_need_bytes(n, 8, d=d) / gib
        row = dict(n=n, d=d, backend="stored", status=res["status"],
                   estimate_gib=f"{est:.2f}", K_gib=f"{n * n * 8 / gib:.2f}",
                   child_wall_s=res.get("child_wall_s"), commit=provenance.commit(),
                   machine=provenance.machine_line())
        if res["status"] == "ok":
            peak = res["peak_rss_mib"] / 1024
            row.update(peak_rss_gib=f"{peak:.2f}", estimate_over_peak=f"{est / peak:.2f}",
                       seconds=res["seconds"], cg_iterations=res["cg_iterations"],
                       passes=res["passes"])
        print(row, flush=True)
        rows.append(row)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, MEMORY_FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small n: check that it runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tile", type=int, default=128, help="rows per tile (blocked, stored)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_pass.csv")
    ap.add_argument("--memory", action="store_true",
                    help="peak memory of the stored backend -> results/bench_memory_stored.csv")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return memory_child(json.loads(args.child))
    if args.memory:
        return memory(ROOT / "results" / "bench_memory_stored.csv")
    cases = CASES_QUICK if args.quick else CASES
    load_before = os.getloadavg()
    started = time.time()
    rows = roofline(args.reps)
    for n, d, with_dense in cases:
        if with_dense:
            rows += dense_case(n, d, args.reps)
        refs = {}
        rows += blocked_case(n, d, args.tile, args.reps, refs)
        if with_dense:
            rows += stored_case(n, d, args.tile, args.reps, refs)
    load_after = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    side = {
        "script": "scripts/bench_pass.py", "argv": sys.argv[1:], "kernel": KERNEL,
        "columns": COLS, "dtype": "float64", "commit": provenance.commit(),
        "machine": provenance.machine_line(), "versions": provenance.versions(),
        "load_average_before": load_before, "load_average_after": load_after,
        "wall_s": round(time.time() - started, 1),
        "note": "load averages are of the whole machine (1, 5, 15 min); other processes shared "
                "its cores during the run",
    }
    args.out.with_suffix(".json").write_text(json.dumps(side, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
