"""How far the fixed-probe SLQ objective's optimum sits from the exact one, by estimator setting.

L-BFGS on a fixed-probe SLQ objective converges to *that* objective's optimum, not to the exact
maximum-likelihood fit. How far apart the two are is set by the estimator, not the optimiser.
This script measures it where it matters, at the exact optimum theta* of a data set
(``scripts/exact_optimum.py``'s progress file: its best full-n point, whose exact loss and
gradient are recorded):

* ``value_bias``: mean over seeds of the SLQ loss minus the exact loss at theta*, nats per datum
  (the SLQ value that the trainer reports and compares), and ``value_sd`` its spread;
* ``grad_err``: |grad SLQ - grad exact| at theta* (raw coordinates, per datum), mean over seeds;
* ``predicted_gap``: 1/2 e^T H^-1 e with e that gradient error and H the exact loss's Hessian:
  to second order, the exact loss at the fixed-probe optimum exceeds the exact optimum by this
  much. H is the forward-difference Hessian of the exact loss on the first ``--subset`` rows at
  theta* (per datum, so comparable; eigenvalues made positive and floored at 1e-6 of the
  largest, :func:`exact_optimum.hessian_preconditioner`): a proxy, so the column ranks settings
  rather than predicting a gap to the last digit (``bench_optimum.py`` measures real gaps).
  ``grad_error`` keeps e itself, so the gap of the seed-mean error (the deterministic part: the
  quadrature's bias) can be formed from the rows (``make_table.py``).

The estimator is ``gpadjoint.mll.neg_mll`` exactly as the trainer calls it (preconditioner built
at theta*, log-det split, Rademacher probes), with CG run to 1e-10 from the exact solve so that
only the log-det estimate differs. Dense backend, float64, paper units (targets centred, not
scaled). One row per (rank, depth, probes, seed) in ``results/estimator_bias.csv``; rows already
there for the same reference point are kept, so a stopped run resumes.

    python scripts/estimator_bias.py elevators 0 --ranks 30 100 300 1000 --depths 15 --seeds 4
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT = bu.ROOT / "results" / "estimator_bias.csv"
SUMMARY = bu.ROOT / "results" / "estimator_bias_summary.csv"
SUMMARY_FIELDS = ["dataset", "split", "reference_loss", "rank", "depth", "probes", "seeds",
                  "value_bias", "value_sd", "grad_err", "gap_mean", "gap_of_mean",
                  "seconds_per_eval"]
REF_DIR = bu.ROOT / "results" / "optimum"
FIELDS = ["dataset", "split", "n", "reference_loss", "reference_grad_norm", "rank", "depth",
          "probes", "seed", "slq_loss", "value_bias", "grad_err", "predicted_gap", "seconds",
          "cg_iterations", "grad_error", "load_avg", "commit", "machine", "started"]


def best_point(progress: Path) -> dict:
    """Return the best full-n evaluation of an exact_optimum progress file (raw, loss, grad)."""
    recs = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    full = [r for r in recs if r.get("stage") == "full" and "loss" in r and "grad" in r]
    if not full:
        raise SystemExit(f"{progress}: no full-n evaluation yet; run scripts/exact_optimum.py")
    return min(full, key=lambda r: r["loss"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("split", type=int)
    ap.add_argument("--ranks", nargs="+", type=int, default=[30, 100, 300])
    ap.add_argument("--depths", nargs="+", type=int, default=[15])
    ap.add_argument("--probes", nargs="+", type=int, default=[10])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--subset", type=int, default=4000, help="rows for the Hessian proxy")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import exact_optimum as eo
    import jax.numpy as jnp

    from gpadjoint.datasets import load_dataset
    from gpadjoint.matvec import make_backend
    from gpadjoint.mll import MLLConfig, neg_mll

    ref = best_point(REF_DIR / f"{args.dataset}-split{args.split}.progress.jsonl")
    theta, g_exact = np.asarray(ref["raw"]), np.asarray(ref["grad"])
    sp = load_dataset(args.dataset, args.split, scale_y=False)
    X = np.asarray(sp.X_train, np.float64)
    y = np.asarray(sp.y_train, np.float64)
    n = X.shape[0]
    print(f"{args.dataset} split {args.split}: n = {n}, reference loss {ref['loss']:.10f} "
          f"(|g| {ref['grad_norm']:.2e})", flush=True)

    out = Path(args.out)
    done = set()
    if out.exists():
        with out.open() as f:
            for r in csv.DictReader(f):
                if (r["dataset"], int(r["split"]), float(r["reference_loss"])) == (
                        args.dataset, args.split, ref["loss"]):
                    done.add((int(r["rank"]), int(r["depth"]), int(r["probes"]), int(r["seed"])))

    t0 = time.perf_counter()
    fg_sub = eo.make_value_and_grad(X[: args.subset], y[: args.subset])
    M, _ = eo.hessian_preconditioner(fg_sub, theta)
    Hinv = M @ M.T
    print(f"Hessian proxy on {args.subset} rows: {time.perf_counter() - t0:.1f} s", flush=True)

    Xj, yj, p0 = jnp.asarray(X), jnp.asarray(y), eo.unflatten(theta)
    backend = make_backend("dense", eo.KERNEL)
    x0 = None
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for rank in args.ranks:
            for depth in args.depths:
                for p in args.probes:
                    cfg = MLLConfig(num_probes=p, lanczos_depth=depth, precond_rank=rank,
                                    cg_tol=1e-10, cg_max_iter=20000, estimator="slq",
                                    precond_logdet=True)
                    fn = jax.jit(jax.value_and_grad(
                        lambda q, X, y, key, x0, cfg=cfg: neg_mll(
                            q, X, y, key, backend=backend, config=cfg, x0=x0), has_aux=True))
                    for seed in range(args.seeds):
                        if (rank, depth, p, seed) in done:
                            continue
                        t = time.perf_counter()
                        (v, aux), g = fn(p0, Xj, yj, jax.random.PRNGKey(1000 + seed),
                                         x0 if x0 is not None else jnp.zeros(n))
                        x0 = aux["alpha"]  # CG then starts at the solve (no effect on value)
                        e = eo.flatten(g) - g_exact
                        row = {
                            "dataset": args.dataset, "split": args.split, "n": n,
                            "reference_loss": ref["loss"], "reference_grad_norm": ref["grad_norm"],
                            "rank": rank, "depth": depth, "probes": p, "seed": seed,
                            "slq_loss": float(v), "value_bias": float(v) - ref["loss"],
                            "grad_err": float(np.linalg.norm(e)),
                            "predicted_gap": float(0.5 * e @ Hinv @ e),
                            "seconds": round(time.perf_counter() - t, 2),
                            "cg_iterations": int(aux["cg_iterations"]),
                            "grad_error": json.dumps([float(v) for v in e]),
                            "load_avg": " ".join(f"{a:.2f}" for a in os.getloadavg()),
                            "commit": bu.git_commit(), "machine": bu.machine(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        }
                        w.writerow(row)
                        f.flush()
                        print(f"rank {rank:5d} depth {depth:3d} probes {p:3d} seed {seed}: "
                              f"value bias {row['value_bias']:+.2e}  |e| {row['grad_err']:.2e}  "
                              f"gap~ {row['predicted_gap']:.2e}  ({row['seconds']} s)", flush=True)
    write_summary(out, Path(args.out).with_name(SUMMARY.name), Hinv, ref["loss"])
    return 0


def write_summary(rows_path: Path, out: Path, Hinv: np.ndarray, ref_loss: float) -> None:
    """One row per setting for this reference point (replacing its earlier summary rows)."""
    with rows_path.open() as f:
        rows = [r for r in csv.DictReader(f) if float(r["reference_loss"]) == ref_loss]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((int(r["rank"]), int(r["depth"]), int(r["probes"])), []).append(r)
    kept = []
    if out.exists():
        with out.open() as f:
            kept = [r for r in csv.DictReader(f) if float(r["reference_loss"]) != ref_loss]
    summary = []
    for (rank, depth, probes), rs in sorted(groups.items()):
        vb = np.asarray([float(r["value_bias"]) for r in rs])
        E = np.asarray([json.loads(r["grad_error"]) for r in rs])
        em = E.mean(axis=0)
        secs = [float(r["seconds"]) for r in rs[1:]] or [float(rs[0]["seconds"])]
        summary.append({
            "dataset": rs[0]["dataset"], "split": rs[0]["split"], "reference_loss": ref_loss,
            "rank": rank, "depth": depth, "probes": probes, "seeds": len(rs),
            "value_bias": f"{vb.mean():+.2e}",
            "value_sd": f"{vb.std(ddof=1):.1e}" if len(rs) > 1 else "",
            "grad_err": f"{np.linalg.norm(E, axis=1).mean():.1e}",
            "gap_mean": f"{np.mean([float(r['predicted_gap']) for r in rs]):.1e}",
            "gap_of_mean": f"{0.5 * em @ Hinv @ em:.1e}",
            "seconds_per_eval": f"{np.mean(secs):.0f}",  # the first call includes compilation
        })
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(kept + summary)


if __name__ == "__main__":
    raise SystemExit(main())
