"""The ``gpadjoint`` command line: ``fit``, ``predict`` and ``datasets``.

Stage 8 (model -> **cli** -> results). ``gpadjoint fit --dataset elevators`` loads a shipped UCI
split, fits the hyperparameters with the configured estimator, reports test RMSE and NLL in the
target's units, and writes a JSON run record with full provenance under ``results/runs/`` of the
current working folder (checkpoints under ``results/checkpoints/``), wherever gpadjoint is
installed.
SIGINT/SIGTERM during a fit stop it after the current epoch, write a checkpoint and a partial
run record; ``--resume`` continues from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import provenance


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def _load_run_config(path: str | None):
    from .config import default_config, load_config

    if path:
        return load_config(path), str(path)
    return default_config(), "gpadjoint/default.toml (packaged defaults)"


def _write_json_atomic(path: Path, obj) -> None:
    from ._io import atomic_write

    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1, default=_json_default),
                 binary=False)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


class _StopFlag:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop after this epoch."""

    def __init__(self, quiet: bool):
        self.signal = None
        self.quiet = quiet
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this epoch, then saving a checkpoint "
              "(send it again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def record_path(out: str | None, run_id: str, now: datetime | None = None) -> Path:
    """Where ``fit --out OUT`` writes the run record.

    No ``--out``: ``results/runs/<run_id>-<UTC time>.json`` under the current working folder.
    An existing directory (or a path ending in a separator) receives that same file name inside
    it. Anything else is the file.
    """
    name = f"{run_id}-{(now or datetime.now(timezone.utc)):%Y%m%dT%H%M%SZ}.json"
    if not out:
        return Path.cwd() / "results" / "runs" / name
    if Path(out).is_dir() or out.endswith(("/", os.sep)):
        return Path(out) / name
    return Path(out)


def _load_split(args, cfg):
    """Return ``(split, name)``: the shipped split or the user's CSV the command names."""
    from . import data as gdata
    from . import datasets as gdatasets

    if args.dataset and args.data:
        raise SystemExit("error: give either --dataset NAME or --data FILE.csv, not both")
    if args.dataset:
        return gdatasets.load_dataset(args.dataset, args.split,
                                      scale_y=cfg.model.normalize_y), args.dataset
    if args.data:
        if not args.target:
            raise SystemExit("error: --data FILE.csv needs --target COLUMN (the column to predict)")
        split = gdata.load_csv(args.data, args.target, test_fraction=args.test_fraction,
                               seed=cfg.train.random_state, scale_y=cfg.model.normalize_y)
        return split, Path(args.data).stem
    raise SystemExit("error: say what to fit: --dataset NAME (see `gpadjoint datasets`) "
                     "or --data FILE.csv --target COLUMN")


def _run_record(model, cfg, cfg_source, t_start, *, name, split, n_test, checkpoint,
                interrupted) -> dict:
    """Return the run record of a fitted GPRegressor (prediction's keys are added after)."""
    import numpy as np

    hist = model.history_
    n, d = model.X_train_.shape
    record = {
        "dataset": name,
        "split": split,
        "backend": model.backend_,
        "backend_reason": model.backend_reason_,
        "mesh": model.mesh_record_,
        "estimator": model.estimator_,
        "estimator_reason": model.estimator_reason_,
        "optimizer": model.optimizer_,
        "optimizer_reason": model.optimizer_reason_,
        "dtype": cfg.model.dtype,
        "kernel": cfg.model.kernel,
        "config": cfg.to_dict(),
        "config_source": cfg_source,
        "seed": cfg.train.random_state,
        "versions": provenance.versions(),
        "machine": provenance.machine(),
        "commit": provenance.commit(),
        "command": sys.argv,
        "started": datetime.fromtimestamp(t_start, timezone.utc).isoformat(),
        "n_train": n,
        "n_test": n_test,
        "d": d,
        "checkpoint": str(checkpoint),
        "stopped_reason": model.stopped_reason_,
        # the subset fit the run started from ([train] init_subset), its seconds included in
        # train_seconds
        "init_subset": model.init_subset_,
        # whether all rows were fitted after that start ([train] full_fit), and why
        "full_fit": model.full_fit_,
        "complete": not interrupted and (len(hist) > 0 or not model.full_fit_["fit"]),
        "history": hist,
        # L-BFGS records the value at the parameters it returns; Adam the one entering its last
        # step
        "final_train_loss": hist[-1].get("new_loss", hist[-1]["loss"]) if hist else None,
        "seconds_per_epoch": (float(np.median([h["seconds"] for h in hist])) if hist else None),
        "train_seconds": model.fit_seconds_,
        "compile_seconds": model.fit_info_.get("compile_seconds"),
    }
    hp = model.hyperparameters_
    record["hyperparameters"] = {
        "lengthscale": np.asarray(hp["lengthscale"], np.float64).tolist(),
        "outputscale": hp["outputscale"],
        "noise": hp["noise"],
        "mean": hp["mean"],
    }
    return record


def _test_scores(model, X_test, y_test) -> dict:
    """Test RMSE and mean NLL of the noisy predictive, in the target's units, and the solve."""
    import numpy as np

    t0 = time.time()
    mean, std = model.predict(X_test, return_std=True)
    var = std**2
    err = np.asarray(y_test, np.float64) - mean
    solve = model.solve_info_
    return dict(
        test_rmse=float(np.sqrt(np.mean(err**2))),
        test_nll=float(np.mean(0.5 * np.log(2 * math.pi * var) + 0.5 * err**2 / var)),
        predict_seconds=solve["seconds"] + time.time() - t0,
        predict_cg_iterations=solve["iterations"], predict_cg_residual=solve["residual"],
        variance_method=model.variance_, predict_solver=model.solver_,
    )


def cmd_fit(args) -> int:
    """`gpadjoint fit`: :class:`~gpadjoint.model.GPRegressor` on a split, plus a run record.

    The settings are the config file's (default: the packaged defaults) with the command-line
    flags on top; the estimator fits with exactly those (``GPRegressor(config=cfg)``), and the
    record stores them.
    """
    from .model import GPRegressor
    from .sharding import make_mesh

    cfg, cfg_source = _load_run_config(args.config)
    cfg = cfg.with_overrides(
        model__backend=args.backend, model__dtype=args.dtype, model__kernel=args.kernel,
        model__normalize_y=args.normalize_y, train__epochs=args.epochs, optim__lr=args.lr,
        train__random_state=args.random_state,
    )
    q = args.quiet

    split, name = _load_split(args, cfg)
    X_train, y_train = split.unscale_X(split.X_train), split.unscale_y(split.y_train)
    X_test, y_test = split.unscale_X(split.X_test), split.unscale_y(split.y_test)
    n, d = X_train.shape
    _say(f"data: {name} split {args.split}: {n} train / {X_test.shape[0]} test points, "
         f"d = {d}", q)
    _say(f"config: {cfg_source}", q)
    try:
        make_mesh(args.devices)  # checked here so that the error names the flag
    except ValueError as err:
        raise SystemExit(f"error: --devices: {err}") from None

    # ---- training: the estimator, with checkpoints and a stop on SIGINT/SIGTERM
    run_id = f"{name}-split{args.split}-seed{cfg.train.random_state}"
    ckpt = Path(args.checkpoint) if args.checkpoint else (
        Path.cwd() / "results" / "checkpoints" / (run_id + ".ckpt"))
    if args.resume and not ckpt.exists():
        raise SystemExit(f"error: --resume: no checkpoint at {ckpt}; run without --resume first "
                         "(or pass --checkpoint PATH)")
    model = GPRegressor(config=cfg, devices=args.devices, verbose=not q)
    t_start = time.time()
    with _StopFlag(q) as stop:
        model.fit(
            X_train, y_train, checkpoint=ckpt, resume=args.resume,
            callback=lambda rec, state: stop.signal is not None,
            settings={"dataset": name, "split": args.split},
            progress=False if q else "auto",
        )
    record = _run_record(model, cfg, cfg_source, t_start, name=name, split=args.split,
                         n_test=int(X_test.shape[0]), checkpoint=ckpt,
                         interrupted=stop.signal is not None)
    hist, interrupted = model.history_, stop.signal is not None

    out = record_path(args.out, run_id)
    if interrupted:
        record["test_rmse"] = record["test_nll"] = None
        _write_json_atomic(out, record)
        # Always said, --quiet or not: the user must learn how to continue.
        print(f"interrupted by {stop.signal}: checkpoint {ckpt}, partial run record {out}; "
              "continue with the same command plus --resume", file=sys.stderr, flush=True)
        return 130

    # ---- prediction on the test split, in the target's units
    if model.predict_dtype_ != cfg.model.dtype:
        _say(f"prediction in {model.predict_dtype_} (the exact estimator's precision)", q)
    record.update(_test_scores(model, X_test, y_test))
    rmse, nll = record["test_rmse"], record["test_nll"]
    _write_json_atomic(out, record)
    if args.save_model:
        model.save(args.save_model)
        _say(f"model saved to {args.save_model}", q)

    if hist:
        trained = (f"final train loss {record['final_train_loss']:.4f}   "
                   f"{record['seconds_per_epoch']:.2f} s/epoch ({len(hist)} epochs, ")
    else:  # full_fit kept the subset start (or epochs = 0): no step on all n
        trained = "no full-n step (" + model.stopped_reason_.split(":")[0] + ", "
    print(f"test RMSE {_num(rmse)}   test NLL {_num(nll)}   {trained}"
          f"{model.fit_seconds_:.0f} s training, {record['predict_seconds']:.0f} s prediction)")
    print(f"run record: {out}")
    return 0


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def cmd_datasets(args) -> int:
    """`gpadjoint datasets`: one line per data set, and whether it is here or must be fetched."""
    from .datasets import SHIPPED_DATA_DIR, default_cache_dir, list_datasets

    rows = list_datasets()
    print(f"shipped with gpadjoint: {SHIPPED_DATA_DIR}")
    print(f"downloads (GPADJOINT_DATA): {default_cache_dir()}")
    print(f"{'name':16s} {'n':>8s} {'d':>4s}  {'splits':>6s}  where")
    for r in rows:
        if r["shipped"]:
            where = "shipped" if r["available"] else "shipped, but missing here: reinstall"
        elif r["available"]:
            where = "downloaded"
        else:
            where = f"to download: gpadjoint.datasets.download_dataset({r['name']!r})"
        print(f"{r['name']:16s} {r['n']:8d} {r['d']:4d}  {r['n_splits']:6d}  {where}")
    return 0


def cmd_predict(args) -> int:
    """`gpadjoint predict`: mean and std of a saved model on a CSV of inputs."""
    import numpy as np
    import pandas as pd

    from .model import GPRegressor

    model = GPRegressor.load(args.model)
    try:
        df = pd.read_csv(args.data)
    except (OSError, pd.errors.ParserError) as e:
        raise SystemExit(f"error: cannot read {args.data}: {e}") from None
    if args.target:
        if args.target not in df.columns:
            raise SystemExit(f"error: --target {args.target!r} is not a column of {args.data}; "
                             f"columns: {', '.join(map(str, df.columns))}")
        df = df.drop(columns=[args.target])
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise SystemExit(f"error: non-numeric columns in {args.data}: {', '.join(map(str, bad))}")
    X = df.to_numpy(np.float64)
    mean, std = model.predict(X, return_std=True)
    out = pd.DataFrame({"mean": mean, "std": std})
    if args.out:
        out.to_csv(args.out, index=False)
        print(f"wrote {len(out)} predictions to {args.out}")
    else:
        out.to_csv(sys.stdout, index=False)
    return 0


class _Renamed(argparse.Action):
    """An old flag: stop with an error that names its new spelling (scikit-learn's name)."""

    def __init__(self, option_strings, dest, new: str, **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new} (scikit-learn's name for it)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (one sub-command per verb)."""
    p = argparse.ArgumentParser(
        prog="gpadjoint",
        description="Fit Gaussian-process hyperparameters by the adjoint of the Lanczos "
        "iteration.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit a GP on a shipped data set or a CSV file")
    f.add_argument("--dataset", help="shipped data set name (see `gpadjoint datasets`)")
    f.add_argument("--split", type=int, default=0, help="official split index (default 0)")
    f.add_argument("--data", help="your own CSV file (with a header row)")
    f.add_argument("--target", help="with --data: the column to predict")
    f.add_argument("--test-fraction", type=float, default=0.1,
                   help="with --data: fraction held out for testing (default 0.1)")
    f.add_argument("--config", help="TOML config (default: the packaged gpadjoint/default.toml)")
    f.add_argument("--backend", choices=["auto", "dense", "blocked", "keops"])
    f.add_argument("--devices", help="shard the rows over N devices, or 'all' "
                   "(default: one device; see gpadjoint.sharding)")
    f.add_argument("--kernel", choices=["rbf", "matern12", "matern32", "matern52"])
    f.add_argument("--epochs", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--dtype", choices=["float32", "float64"])
    f.add_argument("--random-state", type=int, metavar="SEED",
                   help="the run's seed (default: the config's train.random_state)")
    f.add_argument("--normalize-y", action=argparse.BooleanOptionalAction, default=None,
                   help="scale targets to unit variance (default: the config's "
                   "model.normalize_y)")
    for old, new in (("--seed", "--random-state"), ("--scale-y", "--normalize-y"),
                     ("--no-scale-y", "--no-normalize-y")):
        f.add_argument(old, action=_Renamed, new=new, nargs="?", help=argparse.SUPPRESS)
    f.add_argument("--out", help="run-record JSON file, or a directory to write "
                   "<run>-<time>.json into (default ./results/runs/)")
    f.add_argument("--checkpoint",
                   help="checkpoint file (default ./results/checkpoints/<run>.ckpt)")
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    f.add_argument("--save-model", help="write the fitted model to this file")
    f.add_argument("--quiet", action="store_true", help="print only the final summary")
    f.set_defaults(func=cmd_fit)

    d = sub.add_parser("datasets", help="list the data sets with n, d and whether shipped")
    d.set_defaults(func=cmd_datasets)

    pr = sub.add_parser("predict", help="predict with a saved model on a CSV of inputs")
    pr.add_argument("--model", required=True, help="model file written by fit --save-model")
    pr.add_argument("--data", required=True, help="CSV with the same feature columns as fit")
    pr.add_argument("--target", help="a column to drop before predicting (e.g. the target)")
    pr.add_argument("--out", help="output CSV (default: stdout)")
    pr.set_defaults(func=cmd_predict)
    return p


def main(argv=None) -> int:
    """Entry point of the ``gpadjoint`` console script."""
    import jax

    args = build_parser().parse_args(argv)
    try:
        with jax.enable_x64(True):  # float64 runs and the exact estimator; scoped to this call
            return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
