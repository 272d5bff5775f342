"""The mixed-precision blocked pass against the float64 one where it matters: at fitted end points.

``precision = "mixed"`` ([model], blocked backend) evaluates kernel entries in float32 and keeps
products, sums and Krylov vectors in float64. ``bench_pass.py`` times it and gives its error on
one pass; this script asks whether that error moves what the fit compares. At a run's end point
(the ``final_hyperparameters`` of a ``results/uci`` record) it evaluates the default estimator
(packaged [mll] settings, the run's probes, the preconditioner built at that point) once with each
precision, and writes one row per (record, precision) to ``results/mixed_endpoints.csv``: the
loss (nats per datum, scaled targets as the fit sees them), the gradient's norm, CG iterations
and final relative residual, passes, seconds; and on the mixed row its differences from full:
``loss_diff`` (absolute) and ``grad_rel_diff`` (|g_mixed - g_full| / |g_full|).

The bar (keep mixed only if both hold): ``loss_diff`` <= 1e-6 nats/datum and ``grad_rel_diff``
<= 1e-4, with CG still reaching ``cg_tol``.

    python scripts/bench.py mixed results/uci/elevators-split0-gpadjoint-default-dense-200ep.json
    python scripts/bench.py mixed RECORD --depth 120       # pol: the depth its run deepened to
    python scripts/bench.py mixed RECORD --subset 3000 --out /tmp/x.csv   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

FIELDS = ["dataset", "split", "n", "d", "precision", "depth", "loss", "grad_norm",
          "cg_iterations", "cg_residual", "cg_tol", "passes", "seconds", "loss_diff",
          "grad_rel_diff", "meets_bar", "record"]
LOSS_BAR, GRAD_BAR = 1e-6, 1e-4


def end_point(record: Path, subset: int | None):
    """-> (X, y, params, seed, meta) of a record's end point in the fit's internal units."""
    from gpadjoint.config import default_config
    from gpadjoint.datasets import load_dataset
    from gpadjoint.kernels import unconstrain

    rec = json.loads(record.read_text())
    s = load_dataset(rec["dataset"], rec["split"], scale_y=True)  # as the default fits
    ys = float(s.y_std)
    hp = rec["final_hyperparameters"]  # z-scored inputs, centred (unscaled) targets
    X, y = np.asarray(s.X_train, np.float64), np.asarray(s.y_train, np.float64)
    if subset:
        rows = np.random.default_rng(0).permutation(len(y))[:subset]
        X, y = X[rows], y[rows]
    floor = default_config().model.noise_floor
    params = unconstrain(np.asarray(hp["lengthscale"]), hp["outputscale"] / ys**2,
                         hp["noise"] / ys**2, hp["mean"] / ys, noise_floor=floor,
                         dtype=jnp.float64)
    meta = {"dataset": rec["dataset"], "split": rec["split"], "n": len(y), "d": X.shape[1],
            "record": record.name}
    return jnp.asarray(X), jnp.asarray(y), params, bu.seed_for(rec["split"]), meta


def evaluate(X, y, params, seed, precision: str, depth: int | None):
    """One value-and-gradient of the default estimator with the blocked backend."""
    from gpadjoint.config import default_config
    from gpadjoint.kernels import constrain
    from gpadjoint.matvec import make_backend
    from gpadjoint.mll import neg_mll, precond_factors
    from gpadjoint.plan import resolve_estimator

    cfg = default_config()
    mll = dataclasses.replace(cfg.mll, estimator="slq")
    if depth is not None:
        mll = dataclasses.replace(mll, lanczos_depth=depth)
    mll, _ = resolve_estimator(X.shape[0], mll)
    be = make_backend("blocked", cfg.model.kernel, tile=cfg.model.tile, precision=precision)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)  # the trainer's probes
    pre = precond_factors(X, be.kernel, constrain(params, mll.noise_floor), mll)

    def vg(p):
        return jax.value_and_grad(
            lambda p: neg_mll(p, X, y, key, backend=be, config=mll, precond=pre), has_aux=True)(p)

    exe = jax.jit(vg).lower(params).compile()
    t0 = time.perf_counter()  # the evaluation alone, compiled beforehand
    (value, aux), grad = jax.block_until_ready(exe(params))
    seconds = time.perf_counter() - t0
    g = np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(grad)])
    return {"loss": float(value), "grad": g, "grad_norm": float(np.linalg.norm(g)),
            "cg_iterations": int(aux["cg_iterations"]), "cg_residual": float(aux["cg_residual"]),
            "cg_tol": mll.cg_tol, "passes": int(aux["passes"]), "seconds": seconds,
            "depth": mll.lanczos_depth}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path, help="results/uci records (end points)")
    ap.add_argument("--depth", type=int, help="Lanczos depth (default: the packaged start "
                    "depth; give the depth the run deepened to)")
    ap.add_argument("--subset", type=int, help="first N rows of a fixed permutation (checks)")
    ap.add_argument("--out", type=Path, default=bu.ROOT / "results" / "mixed_endpoints.csv")
    args = ap.parse_args(argv)
    load_before, started = bu.load_avg(), time.time()
    rows = []
    for record in args.records:
        X, y, params, seed, meta = end_point(record, args.subset)
        full = evaluate(X, y, params, seed, "full", args.depth)
        mixed = evaluate(X, y, params, seed, "mixed", args.depth)
        loss_diff = abs(mixed["loss"] - full["loss"])
        grad_diff = float(np.linalg.norm(mixed["grad"] - full["grad"]) / full["grad_norm"])
        meets = (loss_diff <= LOSS_BAR and grad_diff <= GRAD_BAR
                 and mixed["cg_residual"] <= mixed["cg_tol"])
        for name, r in (("full", full), ("mixed", mixed)):
            row = meta | {k: r[k] for k in FIELDS if k in r} | {"precision": name}
            if name == "mixed":
                row |= {"loss_diff": f"{loss_diff:.3e}", "grad_rel_diff": f"{grad_diff:.3e}",
                        "meets_bar": meets}
            rows.append(row)
            print(row, flush=True)
    # one row per (record, precision, depth, n): a rerun replaces its own
    key = ("record", "precision", "depth", "n")
    mine = {tuple(str(r[k]) for k in key) for r in rows}
    bu.replace_rows(args.out, rows, FIELDS, lambda r: tuple(r[k] for k in key) in mine)
    side = {"script": "scripts/mixed_endpoints.py", "commit": bu.git_commit(),
            "machine": bu.machine(), "versions": bu.versions(),
            "argv": sys.argv[1:] if argv is None else list(argv), "load_avg_before": load_before,
            "load_avg_after": bu.load_avg(), "wall_s": round(time.time() - started, 1),
            "bar": {"loss_diff": LOSS_BAR, "grad_rel_diff": GRAD_BAR}}
    args.out.with_suffix(".json").write_text(json.dumps(side, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
