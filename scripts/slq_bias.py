"""How far the default's SLQ estimate (value and gradient) sits from the exact loss at one point.

    python scripts/slq_bias.py DATASET [--split K] (--checkpoint FILE | --record FILE)
                               [--grid DEPTH,RANK ...]

At the parameters of a fit (a checkpoint's current point, or a run record's
``final_hyperparameters``), in the default's units (inputs z-scored, targets scaled), it
evaluates the exact loss and gradient (float64 blocked Cholesky, :mod:`gpadjoint.exact`) and the
default's SLQ estimator (its probes, ``precond_logdet``, the preconditioner built at that point)
at each (Lanczos depth, preconditioner rank) of the grid, and writes
``results/slq_bias/<dataset>-split<k>.json``: per setting the loss bias (SLQ - exact, nats per
datum), the estimator's own ``depth_change``, CG iterations, and the gradient in the trainer's
coordinates (:func:`gpadjoint.coords.to_opt`) beside the exact one, with |g_slq - g_exact|.

The question it answers: is a fit's end point set by the estimator's bias (a gradient that
vanishes where the exact one does not), by the optimiser, or by its stop rule?
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

from gpadjoint import coords  # noqa: E402
from gpadjoint.config import default_config  # noqa: E402
from gpadjoint.data import normalisation  # noqa: E402
from gpadjoint.datasets import load_dataset  # noqa: E402
from gpadjoint.exact import flatten, make_value_and_grad, unflatten  # noqa: E402
from gpadjoint.kernels import Params, unconstrain  # noqa: E402
from gpadjoint.matvec import make_backend  # noqa: E402
from gpadjoint.mll import neg_mll  # noqa: E402

OUT_DIR = bu.ROOT / "results" / "slq_bias"
GRID = ((15, 300), (30, 300), (60, 300), (100, 300), (15, 1000), (30, 1000))


def scaled_data(dataset: str, split: int):
    """(X, y) of the training split as the default fits them: z-scored inputs, scaled targets."""
    sp = load_dataset(dataset, split, scale_y=True)
    X, y = sp.unscale_X(sp.X_train), sp.unscale_y(sp.y_train)
    x_mean, x_std, y_mean, y_std = normalisation(X, y, True)
    return (X - x_mean) / x_std, (y - y_mean) / y_std, y_std


def point(args, y_std: float, noise_floor: float) -> tuple[Params, str]:
    """Raw float64 parameters in the default's units, and where they came from."""
    if args.checkpoint:
        with np.load(args.checkpoint, allow_pickle=False) as z:
            p = Params(*(jnp.asarray(z[f"params_{i}"], jnp.float64) for i in range(4)))
        return p, f"checkpoint {args.checkpoint} (epoch {int(np.load(args.checkpoint)['epoch'])})"
    h = json.loads(Path(args.record).read_text())
    h = h.get("final_hyperparameters", h)  # paper units: targets centred, not scaled
    p = unconstrain(np.asarray(h["lengthscale"], np.float64), h["outputscale"] / y_std**2,
                    h["noise"] / y_std**2, h.get("mean", 0.0) / y_std,
                    noise_floor=noise_floor, dtype=jnp.float64)
    return p, f"record {args.record}"


def opt_gradient(p: Params, g: Params) -> list[float]:
    return coords.flat(coords.opt_grad(jax.device_get(g), jax.device_get(p))).tolist()


def slq_row(p, X, y, cfg, depth: int, rank: int, seed: int) -> dict:
    c = dataclasses.replace(cfg, lanczos_depth=min(depth, X.shape[0]),
                            precond_rank=min(rank, X.shape[0]))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)  # the trainer's probes
    backend = make_backend("dense", "matern32")
    t = time.perf_counter()
    f = jax.jit(lambda q: jax.value_and_grad(lambda r: neg_mll(
        r, X, y, key, backend=backend, config=c, precond_params=q), has_aux=True)(q))
    (v, aux), g = f(p)
    return {"depth": depth, "rank": rank, "loss": float(v),
            "depth_change": float(aux["depth_change"]),
            "cg_iterations": int(aux["cg_iterations"]), "grad_opt": opt_gradient(p, g),
            "seconds": round(time.perf_counter() - t, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("--split", type=int, default=0)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--record")
    ap.add_argument("--grid", nargs="+", help="DEPTH,RANK pairs (default: %(default)s)",
                    default=[f"{d},{r}" for d, r in GRID])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--note", default="", help="what the point is, for the record")
    args = ap.parse_args(argv)
    rc = default_config()
    cfg = dataclasses.replace(rc.mll, noise_floor=rc.model.noise_floor, estimator="slq")
    Xn, yn, y_std = scaled_data(args.dataset, args.split)
    p, source = point(args, y_std, cfg.noise_floor)
    path = args.out_dir / f"{args.dataset}-split{args.split}.json"
    raw = [np.asarray(a).tolist() for a in p]
    old = json.loads(path.read_text()) if path.exists() else None
    if old is not None and old.get("raw_params") == raw:  # the same point: add to its rows
        out, g_exact = old, old["exact"]["grad_opt"]
    else:
        t = time.perf_counter()
        loss, grad = make_value_and_grad(Xn, yn, kernel=rc.model.kernel,
                                         noise_floor=cfg.noise_floor)(flatten(p))
        g_exact = opt_gradient(p, unflatten(grad))
        out = {"dataset": args.dataset, "split": args.split, "n": int(Xn.shape[0]),
               "point": source, "note": args.note, "raw_params": raw,
               "units": "z-scored inputs, targets scaled to unit variance (the default's)",
               "exact": {"loss": float(loss), "grad_opt": g_exact,
                         "seconds": round(time.perf_counter() - t, 2)},
               "rows": [], "commit": bu.git_commit(), "machine": bu.machine(),
               "versions": bu.versions(), "load_before": bu.load_avg()}
    done = {(r["depth"], r["rank"]) for r in out["rows"]}
    Xj, yj = jnp.asarray(Xn), jnp.asarray(yn)
    for item in args.grid:
        depth, rank = (int(v) for v in item.split(","))
        if (depth, rank) in done:
            continue
        row = slq_row(p, Xj, yj, cfg, depth, rank, rc.train.random_state)
        row["bias"] = row["loss"] - out["exact"]["loss"]
        row["commit"] = bu.git_commit()
        row["grad_error"] = float(np.linalg.norm(np.subtract(row["grad_opt"], g_exact)))
        out["rows"].append(row)
        print(f"depth {depth:4d} rank {rank:5d}: bias {row['bias']:+.2e} depth_change "
              f"{row['depth_change']:.2e} |g - g_exact| {row['grad_error']:.2e} "
              f"(|g_exact| {np.linalg.norm(g_exact):.2e}) CG {row['cg_iterations']}", flush=True)
        out["load_after"] = bu.load_avg()
        bu.write_record(path, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
