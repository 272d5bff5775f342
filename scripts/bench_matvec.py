"""Seconds per kernel matvec (and per theta-VJP) and peak memory for each backend.

Writes ``results/bench_matvec.csv`` (one row per configuration, resumable). Matern-3/2 ARD on
synthetic standard-normal inputs with d = 18 (elevators' d). Each configuration runs in its own
process; the time is the median of ``--reps`` calls after one warm-up call (which includes
compilation), and peak_rss_mib is that process's maximum resident memory.

    python scripts/bench_matvec.py                 # the full grid (hours on 2 CPU cores)
    python scripts/bench_matvec.py --n 2000 8000   # a subset
    python scripts/bench_matvec.py --n 16599 --backends blocked --redo   # re-measure, replacing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from gpadjoint.matvec import Backend  # noqa: E402

OUT = bu.ROOT / "results" / "bench_matvec.csv"
KEY = ["backend", "n", "rhs", "dtype", "op"]
FIELDS = KEY + [
    "status", "seconds_median", "seconds_min", "reps", "peak_rss_mib", "kernel", "d", "tile",
    "child_wall_s", "commit", "machine", "versions",
]


def child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpadjoint.kernels import constrain, unconstrain
    from gpadjoint.matvec import make_backend

    dtype = jnp.dtype(spec["dtype"])
    n, d, m = spec["n"], spec["d"], spec["rhs"]
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((n, d)), dtype)
    V = jnp.asarray(rng.standard_normal((n, m)), dtype)
    params = unconstrain(np.full(d, 2.0), 1.0, 0.1, dtype=dtype)
    be = make_backend(spec["backend"], spec["kernel"], tile=spec["tile"])

    if spec["op"] == "matvec":
        f = jax.jit(lambda V, p: be.matvec(X, V, constrain(p)))
    else:  # theta-VJP of u^T K(theta) V, plus V-bar: what a backward pass needs

        def vjp(V, p):
            out, back = jax.vjp(lambda V, p: be.matvec(X, V, constrain(p)), V, p)
            return back(V)

        f = jax.jit(vjp)
    return bu.time_calls(f, (V, params), spec["reps"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 8000, 16599, 40000])
    ap.add_argument("--rhs", type=int, nargs="+", default=[1, 11, 31])
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    ap.add_argument("--backends", nargs="+", default=["dense", "blocked", "keops"])
    ap.add_argument("--ops", nargs="+", default=["matvec", "vjp"])
    ap.add_argument("--kernel", default="matern32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--tile", type=int, default=Backend.tile,
                    help="rows per tile of the blocked backend (default: gpadjoint's)")
    ap.add_argument("--redo", action="store_true",
                    help="measure the selected configurations again, replacing their rows")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    done = bu.done_keys(args.out, KEY)
    prov = bu.provenance_columns()
    for n in args.n:
        for backend in args.backends:
            for dtype in args.dtype:
                for rhs in args.rhs:
                    for op in args.ops:
                        key = (backend, str(n), str(rhs), dtype, op)
                        if key in done and not args.redo:
                            continue
                        row = dict(zip(KEY, key), kernel=args.kernel, d=18, **prov)
                        itemsize = 4 if dtype == "float32" else 8
                        if backend == "dense" and 3 * n * n * itemsize > 20 * 1024**3:
                            row["status"] = "skipped: n x n matrices exceed 20 GiB"
                        else:
                            spec = dict(backend=backend, n=n, rhs=rhs, dtype=dtype, op=op,
                                        kernel=args.kernel, d=18, tile=args.tile, reps=args.reps)
                            row["tile"] = args.tile if backend == "blocked" else ""
                            row.update(bu.run_child(Path(__file__), spec, args.timeout))
                        bu.upsert_row(args.out, row, FIELDS, KEY)
                        print(", ".join(f"{k}={row.get(k)}" for k in KEY + ["status",
                              "seconds_median", "peak_rss_mib"]), flush=True)


if __name__ == "__main__":
    main()
