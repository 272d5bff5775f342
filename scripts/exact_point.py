"""The exact loss and test scores of given hyperparameters at full n, where no optimum can be run.

    python scripts/exact_point.py DATASET SPLIT --subset-start 4000
    python scripts/exact_point.py DATASET SPLIT --params results/uci/<record>.json

appends one line to ``results/optimum/<dataset>-split<k>.points.jsonl``: the loss
-log p(y | theta) / n (2 pi included; inputs z-scored, targets centred, not scaled: the paper's
units, as every record's ``final_train_loss_common``) and the test RMSE and NLL of the exact
posterior, all from one blocked float64 Cholesky (:func:`gpadjoint.evaluate.exact_point`: one
n x n array, ~10 GiB and ~4 minutes at kin40k's n = 36 000 on this CPU).

It exists for data sets where ``exact_optimum.py`` cannot run its L-BFGS (kin40k: one value and
gradient would take ~15 minutes and two n x n arrays). Any point's exact loss is an upper bound
on the optimum's; ``bench_optimum.py`` takes the lowest such bound (these points, the records'
final losses) as its labelled stand-in, so every gap it reports there is a lower bound.

The points:

* ``--subset-start SIZE``: the exact maximum-likelihood fit of SIZE random training rows, as
  ``gpadjoint fit`` computes its start (:func:`gpadjoint.start.subset_start` with the packaged
  defaults: kernel, noise floor, seed; targets scaled to unit variance), converted to the
  paper's units by the package's one unit conversion. How far the loss at full n moves as SIZE
  grows says how far a subset fit is from the full one.
* ``--params FILE``: ``final_hyperparameters`` of a record in ``results/uci/`` (already in the
  paper's units), or a JSON with lengthscale / outputscale / noise / mean in those units.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT_DIR = bu.ROOT / "results" / "optimum"


def subset_point(sp, size: int, paper) -> tuple[dict, dict]:
    """Return the default's subset start for ``size`` rows in the paper's units, and its info.

    ``sp``: the split with targets scaled to unit variance (``scale_y=True``), as the default
    fits it; ``paper``: the same split in the paper's units (``scale_y=False``). The fit goes
    to the data's units and from there to the paper's by the package's one conversion
    (:func:`gpadjoint.data.hyperparameters_in_data_units`, ``_benchutil.split_units``).
    """
    import jax.numpy as jnp

    from gpadjoint.config import default_config
    from gpadjoint.data import hyperparameters_in_data_units
    from gpadjoint.kernels import constrain, init_params
    from gpadjoint.start import SubsetStartWarning, subset_start

    cfg = default_config()
    floor = cfg.model.noise_floor
    X = jnp.asarray(sp.X_train, jnp.float64)
    y = jnp.asarray(sp.y_train, jnp.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SubsetStartWarning)  # recorded in info["interpolating"]
        p, info = subset_start(X, y, init_params(X.shape[1], jnp.float64),
                               kernel=cfg.model.kernel, size=size, seed=cfg.train.random_state,
                               noise_floor=floor, metric=False)
    h = constrain(p, floor)
    fitted = {"lengthscale": np.asarray(h.lengthscale), "outputscale": float(h.outputscale),
              "noise": float(h.noise), "mean": float(p.mean)}
    hyp = bu.split_units(hyperparameters_in_data_units(fitted, sp.x_std, sp.y_mean, sp.y_std),
                         paper)
    keep = ("size", "seed", "steps", "evaluations", "loss", "stopped_reason", "noise",
            "interpolating", "seconds")
    return hyp, {k: info.get(k) for k in keep} | {"units": "scaled targets (y / y_std)",
                                                   "y_std": float(sp.y_std)}


def params_point(path: str) -> tuple[dict, dict]:
    """Hyperparameters in the paper's units from a record or a plain JSON file."""
    rec = json.loads(Path(path).read_text())
    h = rec.get("final_hyperparameters", rec)
    missing = [k for k in ("lengthscale", "outputscale", "noise") if k not in h]
    if missing:
        raise SystemExit(f"--params {path}: no {', '.join(missing)} (expected a results/uci "
                         "record with final_hyperparameters, or a JSON with lengthscale, "
                         "outputscale, noise and mean)")
    hyp = {"lengthscale": [float(v) for v in np.atleast_1d(h["lengthscale"])],
           "outputscale": float(h["outputscale"]), "noise": float(h["noise"]),
           "mean": float(h.get("mean", 0.0))}
    return hyp, {"file": path}


def evaluate_point(s, hyp: dict, *, kernel: str = "matern32") -> dict:
    """Exact loss at full n and test RMSE / NLL of the exact posterior at ``hyp``.

    ``s``: the split in the paper's units (``scale_y=False``).
    """
    from gpadjoint.evaluate import choose_method, exact_point

    method, why = choose_method(s.X_train.shape[0])
    if method != "cholesky":
        raise SystemExit(f"refusing: {why}; the exact loss needs one n x n float64 array in "
                         "memory (close other jobs and rerun)")
    if len(hyp["lengthscale"]) not in (1, s.X_train.shape[1]):
        raise SystemExit(f"{len(hyp['lengthscale'])} lengthscales for d = {s.X_train.shape[1]}")
    out = exact_point(s.X_train, s.y_train, s.X_test, kernel=kernel, **hyp)
    rmse, nll = bu.predictive_scores(s.y_test, out["mean"], out["var"])
    return {"loss": out["loss"], "logdet": out["logdet"], "quad": out["quad"],
            "test_rmse": rmse, "test_nll": nll,
            "min_predictive_variance": float(np.min(out["var"])),
            "n_train": int(s.X_train.shape[0]), "n_test": int(s.X_test.shape[0]),
            "evaluate_seconds": out["seconds"], "memory": why}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("split", type=int)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--subset-start", type=int, metavar="SIZE",
                   help="the default's exact fit of SIZE random rows (gpadjoint.start."
                        "subset_start)")
    g.add_argument("--params", metavar="FILE", help="record or JSON with hyperparameters in "
                                                     "the paper's units")
    ap.add_argument("--label", help="name of the point in the record (default: its source)")
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    if args.subset_start is not None and args.subset_start < 2:
        ap.error("--subset-start needs SIZE >= 2 rows")
    cmd = "python scripts/exact_point.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = bu.load_avg()
    t0 = time.perf_counter()
    paper = bu.load_split(args.dataset, args.split)
    if args.subset_start is not None:
        from gpadjoint.datasets import load_dataset

        hyp, source = subset_point(load_dataset(args.dataset, args.split, scale_y=True),
                                   args.subset_start, paper)
        label = f"subset start, {args.subset_start} rows"
    else:
        hyp, source = params_point(args.params)
        label = f"final hyperparameters of {Path(args.params).name}"
    label = args.label or label
    print(f"{label}: {hyp}", flush=True)
    scores = evaluate_point(paper, hyp)
    rec = {"dataset": args.dataset, "split": args.split, "label": label, "source": source,
           "hyperparameters": hyp,
           "units": "inputs z-scored, targets centred, not scaled (the paper's)",
           "loss_definition": "-log p(y | theta) / n, 2 pi included, float64 blocked Cholesky "
                              "(gpadjoint.evaluate.exact_point)",
           **scores, "wall_seconds": time.perf_counter() - t0, "started": started,
           "load_avg_before": load_before, "load_avg_after": bu.load_avg(),
           "command": cmd, "commit": bu.git_commit(), "machine": bu.machine(),
           "versions": bu.versions(), "script": "scripts/exact_point.py"}
    path = Path(args.out_dir) / f"{args.dataset}-split{args.split}.points.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(f"{label}: loss {rec['loss']:.6f}, test RMSE {rec['test_rmse']:.5f}, NLL "
          f"{rec['test_nll']:.4f} ({rec['wall_seconds']:.0f} s); appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
