"""gpadjoint's command line versus scikit-learn's GaussianProcessRegressor on small UCI sets.

Writes ``results/small_uci_vs_sklearn.csv`` (one row per data set and split, resumable). Both
see the same official split and preprocessing (inputs standardised with training statistics,
targets centred and scaled). scikit-learn: ConstantKernel * Matern(nu=1.5, ARD) + WhiteKernel,
L-BFGS on the exact marginal likelihood (its defaults, no restarts). gpadjoint: ``gpadjoint fit``
with the given config. RMSE in the target's units.

    python scripts/compare_sklearn.py --config gpadjoint/default.toml
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT = bu.ROOT / "results" / "small_uci_vs_sklearn.csv"
KEY = ["dataset", "split", "config"]
FIELDS = KEY + [
    "status", "gpadjoint_rmse", "sklearn_rmse", "rmse_ratio", "gpadjoint_nll", "sklearn_nll",
    "gpadjoint_seconds", "sklearn_seconds", "gpadjoint_epochs", "gpadjoint_estimator",
    "gpadjoint_optimizer", "gpadjoint_train_seconds", "n_train", "d", "load_avg", "commit",
    "machine", "versions",
]


def sklearn_fit(name: str, split: int) -> dict:
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    from gpadjoint.datasets import load_dataset

    s = load_dataset(name, split, scale_y=True)
    d = s.X_train.shape[1]
    kern = ConstantKernel(1.0) * Matern(np.ones(d), nu=1.5) + WhiteKernel(0.1)
    t0 = time.time()
    gp = GaussianProcessRegressor(kern, random_state=0).fit(s.X_train, s.y_train)
    mean, std = gp.predict(s.X_test, return_std=True)
    secs = time.time() - t0
    y = s.y_test * s.y_std + s.y_mean
    m = mean * s.y_std + s.y_mean
    var = (std * s.y_std) ** 2
    return {
        "sklearn_rmse": float(np.sqrt(np.mean((m - y) ** 2))),
        "sklearn_nll": float(np.mean(0.5 * np.log(2 * np.pi * var) + 0.5 * (y - m) ** 2 / var)),
        "sklearn_seconds": secs,
        "n_train": s.X_train.shape[0],
        "d": d,
    }


def gpadjoint_fit(name: str, split: int, config: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "gpadjoint.cli", "fit", "--dataset", name, "--split",
             str(split), "--config", config, "--quiet", "--out", str(out), "--checkpoint",
             str(Path(tmp) / "ckpt")], capture_output=True, text=True, cwd=bu.ROOT)
        secs = time.time() - t0
        if proc.returncode != 0:
            return {"status": f"gpadjoint failed: {proc.stderr.strip()[-200:]}"}
        rec = json.loads(out.read_text())
    return {
        "gpadjoint_rmse": rec["test_rmse"],
        "gpadjoint_nll": rec["test_nll"],
        "gpadjoint_seconds": secs,  # whole command: import, compile, train, predict
        "gpadjoint_epochs": len(rec["history"]),
        "gpadjoint_estimator": rec.get("estimator"),
        "gpadjoint_optimizer": rec.get("optimizer"),
        "gpadjoint_train_seconds": rec.get("train_seconds"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["yacht", "energy", "concrete", "airfoil"])
    ap.add_argument("--splits", type=int, nargs="+", default=[0])
    ap.add_argument("--config", default="gpadjoint/default.toml")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    done = bu.done_keys(args.out, KEY)
    prov = bu.provenance_columns()
    for name in args.datasets:
        for split in args.splits:
            key = (name, str(split), args.config)
            if key in done:
                continue
            row = dict(zip(KEY, key), **prov)
            row["load_avg"] = " ".join(f"{v:.1f}" for v in os.getloadavg())  # others' load
            row.update(gpadjoint_fit(name, split, args.config))
            if "status" not in row:
                row.update(sklearn_fit(name, split), status="ok")
                row["rmse_ratio"] = row["gpadjoint_rmse"] / row["sklearn_rmse"]
            bu.append_row(args.out, row, FIELDS)
            print(", ".join(f"{k}={row.get(k)}" for k in ["dataset", "split", "status",
                  "gpadjoint_rmse", "sklearn_rmse", "rmse_ratio", "gpadjoint_seconds"]),
                  flush=True)


if __name__ == "__main__":
    main()
