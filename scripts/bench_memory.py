"""Peak memory of one value + gradient of the training loss with the KeOps backend, at large n.

The KeOps path never stores an n x n matrix: its memory is O(n (d + probes x depth)) -- the data,
the Lanczos vectors and the adjoint's multipliers. This script measures it: synthetic data
(uniform inputs in [0, 1]^d, a smooth target plus noise), one ``jax.value_and_grad`` of
:func:`gpadjoint.mll.neg_mll` in float32 with the KeOps backend, in a fresh process whose peak
resident memory (``ru_maxrss``, interpreter, JAX and pykeops included) is recorded with the
seconds, the passes the estimator counted, and the settings. One row per (n, d, depth, probes)
in ``results/bench_memory.csv`` (resumable).

On a 2-core CPU one KeOps pass over 200 000^2 pairs takes minutes, so the settings are
explicit: ``--depth``, ``--probes``, ``--cg-iters`` (CG runs exactly that many iterations).
The Lanczos buffers grow as probes x depth x n x 4 bytes (88 MB at depth 10, 10 probes,
n = 200 000), which the ``buffers_mib`` column states next to the measurement.

    python scripts/bench_memory.py --n 200000 --d 8 --depth 2 --probes 2 --cg-iters 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT = bu.ROOT / "results" / "bench_memory.csv"
KEY = ["n", "d", "depth", "probes", "cg_iters", "kernel"]
FIELDS = KEY + [
    "status", "peak_rss_mib", "buffers_mib", "seconds", "passes", "loss", "grad_finite",
    "child_wall_s", "commit", "machine", "versions",
]


def child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpadjoint.kernels import unconstrain
    from gpadjoint.matvec import make_backend
    from gpadjoint.mll import MLLConfig, neg_mll

    n, d = spec["n"], spec["d"]
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(n, d)).astype(np.float32)
    y = (np.sin(3 * X[:, 0]) + np.cos(2 * X[:, 1 % d]) + 0.1 * rng.standard_normal(n))
    X, y = jnp.asarray(X), jnp.asarray(y.astype(np.float32))
    params = unconstrain(np.full(d, 0.5), 1.0, 0.05, 0.0, dtype=jnp.float32)
    cfg = MLLConfig(num_probes=spec["probes"], lanczos_depth=spec["depth"], precond_rank=15,
                    cg_tol=1e-30, cg_min_iter=spec["cg_iters"], cg_max_iter=spec["cg_iters"],
                    estimator="slq")
    be = make_backend("keops", spec["kernel"])
    f = jax.jit(jax.value_and_grad(
        lambda p: neg_mll(p, X, y, jax.random.PRNGKey(0), backend=be, config=cfg),
        has_aux=True))
    t0 = time.perf_counter()
    (value, aux), grad = f(params)
    jax.block_until_ready(grad)
    seconds = time.perf_counter() - t0
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
    return {"seconds": seconds, "passes": int(aux["passes"]), "loss": float(value),
            "grad_finite": finite, "peak_rss_mib": bu.peak_rss_mib()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--n", type=int, nargs="+", default=[200_000])
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--cg-iters", type=int, default=2)
    ap.add_argument("--kernel", default="matern32")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    done = bu.done_keys(args.out, KEY)
    for n in args.n:
        spec = {"n": n, "d": args.d, "depth": args.depth, "probes": args.probes,
                "cg_iters": args.cg_iters, "kernel": args.kernel}
        if tuple(str(spec[k]) for k in KEY) in done:
            print(f"skip (done): {spec}")
            continue
        row = dict(spec)
        row["buffers_mib"] = round(3 * args.probes * (args.depth + 1) * n * 4 / 2**20, 1)
        row.update(bu.run_child(Path(__file__), spec, args.timeout))
        row.update(bu.provenance_columns())
        bu.append_row(args.out, row, FIELDS)
        print(", ".join(f"{k}={row.get(k)}" for k in KEY + ["status", "peak_rss_mib", "seconds",
                                                             "passes"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
