"""Greedy against random pivots for the CG preconditioner, at fitted end points.

The question: at the default's end points, how many preconditioned CG iterations does a solve
to the default tolerance take with a pivoted-Cholesky preconditioner of each pivot rule and rank
(``[mll] precond_pivot``, ``precond_rank``), and how much of K does each leave outside P
(``residual_trace`` = tr(K - L L^T), noise-free K)?

At a record's end point (its ``final_hyperparameters``, scaled targets as the default fits) it
builds K densely (float64, so n up to ~20 000 on this machine), then for each rank and rule the
factor (:func:`gpadjoint.solve.pivoted_cholesky`, random pivots from the key the estimator uses)
and one CG solve of [y - mean, 4 Rademacher probes] to relative residual ``--tol`` (1e-5, the
default's). Iterations are the slowest column's. One row per (record, rank, pivot) in
``results/precond_pivot.csv``; a rerun replaces its own rows.

    python scripts/precond_pivot.py results/uci/pol-split0-gpadjoint-default-dense-200ep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from mixed_endpoints import end_point  # noqa: E402

FIELDS = ["dataset", "split", "n", "d", "noise", "outputscale", "rank", "pivot",
          "cg_iterations", "cg_residual", "residual_trace", "trace_K", "build_s", "record",
          "commit", "load_avg"]


def one(K, X, y, h, rank: int, pivot: str, tol: float, kernel: str) -> dict:
    from gpadjoint.kernels import cross_cov
    from gpadjoint.solve import cg, make_preconditioner, pivoted_cholesky

    n = X.shape[0]
    key = jax.random.PRNGKey(0) if pivot == "random" else None  # as gpadjoint.mll does

    @jax.jit
    def factor():
        return pivoted_cholesky(
            lambda i: cross_cov(kernel, lax.dynamic_slice_in_dim(X, i, 1), X, h)[0],
            jnp.full((n,), h.outputscale, X.dtype), rank, key=key)

    t0 = time.perf_counter()
    L = jax.block_until_ready(factor())
    build = time.perf_counter() - t0
    B = jnp.concatenate([y[:, None], jax.random.rademacher(jax.random.PRNGKey(1), (n, 4),
                                                           X.dtype)], axis=1)
    P = make_preconditioner(L, h.noise)
    _, info = jax.jit(lambda B: cg(lambda V: K @ V, B, precond=P, tol=tol, max_iter=5000))(B)
    trace_K = float(n * h.outputscale)
    return {"rank": rank, "pivot": pivot, "cg_iterations": int(info.iterations),
            "cg_residual": f"{float(jnp.max(info.residual)):.2e}",
            "residual_trace": f"{trace_K - float(jnp.sum(L * L)):.4g}",
            "trace_K": f"{trace_K:.4g}", "build_s": round(build, 1)}


def main(argv=None) -> int:
    from gpadjoint.config import default_config
    from gpadjoint.kernels import constrain, dense_cov

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path, help="results/uci records (end points)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--subset", type=int, help="first N rows of a fixed permutation (checks)")
    ap.add_argument("--out", type=Path, default=bu.ROOT / "results" / "precond_pivot.csv")
    args = ap.parse_args(argv)
    cfg = default_config()
    rows = []
    for record in args.records:
        X, y, params, _, meta = end_point(record, args.subset)
        h = constrain(params, cfg.model.noise_floor)
        K = dense_cov(cfg.model.kernel, X, h)
        r = y - params.mean
        for rank in args.ranks:
            for pivot in ("greedy", "random"):
                row = meta | {"noise": f"{float(h.noise):.4g}",
                              "outputscale": f"{float(h.outputscale):.4g}"}
                row |= one(K, X, r, h, rank, pivot, args.tol, cfg.model.kernel)
                row |= {"commit": bu.git_commit(), "load_avg": bu.load_avg()[0]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del K
    # one row per (record, rank, pivot, n): a rerun replaces its own
    key = ("record", "rank", "pivot", "n")
    mine = {tuple(str(r[k]) for k in key) for r in rows}
    bu.replace_rows(args.out, rows, FIELDS, lambda r: tuple(r[k] for k in key) in mine)
    side = {"script": "scripts/precond_pivot.py", "commit": bu.git_commit(),
            "machine": bu.machine(), "versions": bu.versions(),
            "argv": sys.argv[1:] if argv is None else list(argv), "tol": args.tol}
    args.out.with_suffix(".json").write_text(json.dumps(side, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
