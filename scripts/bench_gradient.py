"""Cost of value+gradient of the SLQ log det: Lanczos adjoint versus backprop through the loop.

Writes ``results/bench_gradient.csv`` (one row per (method, depth), resumable). The operator is a
Matern-3/2 ARD kernel matrix on synthetic inputs (n = 4000, d = 8 by default), built once per
evaluation (dense backend; ``--backend keops`` or ``blocked`` write
``results/bench_gradient_<backend>.csv``), with 10 Rademacher probes; the gradient is taken
w.r.t. the kernel hyperparameters. ``method``:

* ``forward``: the value alone (the reference cost);
* ``adjoint``: value + gradient through gpadjoint's Lanczos adjoint (custom VJP);
* ``backprop``: value + gradient by JAX autodiff through the Lanczos loop.

Each row runs in its own process: median of ``--reps`` timed calls after a warm-up, and the
process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT = bu.ROOT / "results" / "bench_gradient.csv"
KEY = ["method", "depth", "n", "probes", "dtype"]
FIELDS = KEY + [
    "status", "seconds_median", "seconds_min", "reps", "peak_rss_mib", "kernel", "d",
    "child_wall_s", "commit", "machine", "versions",
]


def child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gpadjoint  # noqa: F401
    from gpadjoint import logdet as ld
    from gpadjoint.kernels import constrain, unconstrain
    from gpadjoint.lanczos import lanczos
    from gpadjoint.matvec import make_backend

    dtype = jnp.dtype(spec["dtype"])
    n, d, k, p = spec["n"], spec["d"], spec["depth"], spec["probes"]
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((n, d)), dtype)
    params = unconstrain(np.full(d, 2.0), 1.0, 0.1, dtype=dtype)
    Z = ld.rademacher(jax.random.PRNGKey(0), n, p, dtype)
    be = make_backend(spec.get("backend", "dense"), spec["kernel"])
    adjoint = spec["method"] != "backprop"

    def logdet(params):
        mv, args = be.operator(X, constrain(params))
        tri = lanczos(mv, Z, *args, depth=k, adjoint=adjoint)
        per = jax.vmap(lambda a, b: ld.masked_quadform(a, b, 0.0, ld.logdet_quadform))(
            tri.alpha, tri.beta
        )
        return jnp.mean(tri.norm**2 * per)

    f = jax.jit(logdet if spec["method"] == "forward" else jax.value_and_grad(logdet))
    return bu.time_calls(f, (params,), spec["reps"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--depths", type=int, nargs="+", default=[5, 10, 20, 40, 60, 80, 100])
    ap.add_argument("--methods", nargs="+", default=["forward", "adjoint", "backprop"])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--kernel", default="matern32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--backend", default="dense", choices=["dense", "blocked", "keops"])
    ap.add_argument("--redo", action="store_true",
                    help="measure the selected rows again, replacing them (after a code change)")
    ap.add_argument("--out", type=Path,
                    help="default: results/bench_gradient.csv (dense), else "
                         "results/bench_gradient_<backend>.csv")
    args = ap.parse_args()
    if args.out is None:
        args.out = OUT if args.backend == "dense" else OUT.with_name(
            f"bench_gradient_{args.backend}.csv")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    done = bu.done_keys(args.out, KEY)
    prov = bu.provenance_columns()
    for depth in args.depths:
        for method in args.methods:
            key = (method, str(depth), str(args.n), str(args.probes), args.dtype)
            if key in done and not args.redo:
                continue
            spec = dict(method=method, depth=depth, n=args.n, probes=args.probes,
                        dtype=args.dtype, kernel=args.kernel, d=8, reps=args.reps,
                        backend=args.backend)
            # the backend is in the file name (the dense file predates the option)
            row = dict(zip(KEY, key), kernel=args.kernel, d=8, **prov)
            row.update(bu.run_child(Path(__file__), spec, args.timeout))
            bu.upsert_row(args.out, row, FIELDS, KEY)
            print(", ".join(f"{k}={row.get(k)}" for k in KEY + ["status", "seconds_median",
                  "peak_rss_mib"]), flush=True)


if __name__ == "__main__":
    main()
