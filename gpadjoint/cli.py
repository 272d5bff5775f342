"""The ``gpadjoint`` command line: ``fit``, ``predict`` and ``datasets``.

Stage 8 (model -> **cli** -> results). ``gpadjoint fit --dataset elevators`` loads a shipped UCI
split, fits the hyperparameters with the configured estimator, reports test RMSE and NLL in the
target's units, and writes a JSON run record with full provenance under ``results/runs/``.
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

REPO = provenance.REPO


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

    No ``--out``: ``results/runs/<run_id>-<UTC time>.json``. An existing directory (or a path
    ending in a separator) receives that same file name inside it. Anything else is the file.
    """
    name = f"{run_id}-{(now or datetime.now(timezone.utc)):%Y%m%dT%H%M%SZ}.json"
    if not out:
        return REPO / "results" / "runs" / name
    if Path(out).is_dir() or out.endswith(("/", os.sep)):
        return Path(out) / name
    return Path(out)


def cmd_fit(args) -> int:
    """`gpadjoint fit`: train, evaluate on the test split, write the run record."""
    import jax.numpy as jnp
    import numpy as np

    from . import data as gdata
    from . import predict as gpred
    from .kernels import constrain
    from .matvec import choose_backend, make_backend
    from .train import LBFGS, EarlyStopping, fit, initial_params

    cfg, cfg_source = _load_run_config(args.config)
    cfg = cfg.with_overrides(
        model__backend=args.backend, model__dtype=args.dtype, model__kernel=args.kernel,
        train__epochs=args.epochs, optim__lr=args.lr, train__seed=args.seed,
    )
    q = args.quiet
    dtype = jnp.float32 if cfg.model.dtype == "float32" else jnp.float64

    # ---- data
    scale_y = cfg.model.scale_y if args.scale_y is None else args.scale_y
    if args.dataset and args.data:
        raise SystemExit("error: give either --dataset NAME or --data FILE.csv, not both")
    if args.dataset:
        split = gdata.load_dataset(args.dataset, args.split, scale_y=scale_y)
        name = args.dataset
    elif args.data:
        if not args.target:
            raise SystemExit("error: --data FILE.csv needs --target COLUMN (the column to predict)")
        split = gdata.load_csv(args.data, args.target, test_fraction=args.test_fraction,
                               seed=cfg.train.seed, scale_y=scale_y)
        name = Path(args.data).stem
    else:
        raise SystemExit("error: say what to fit: --dataset NAME (see `gpadjoint datasets`) "
                         "or --data FILE.csv --target COLUMN")
    X = jnp.asarray(split.X_train, dtype)
    y = jnp.asarray(split.y_train, dtype)
    n, d = X.shape
    _say(f"data: {name} split {args.split}: {n} train / {split.X_test.shape[0]} test points, "
         f"d = {d}", q)

    # ---- backend: explicit, or chosen and reported
    if cfg.model.backend == "auto":
        bname, why = choose_backend(n, dtype)
        reason = f"auto: {why}"
    else:
        bname, reason = cfg.model.backend, "requested"
    from .sharding import describe_mesh, make_mesh, mesh_record, shard_rows

    try:
        mesh = make_mesh(args.devices)
    except ValueError as err:
        raise SystemExit(f"error: --devices: {err}") from None
    if mesh is not None:
        X, y = shard_rows(mesh, X), shard_rows(mesh, y)
    backend = make_backend(bname, cfg.model.kernel, tile=cfg.model.tile, mesh=mesh)
    _say(f"backend: {bname} ({reason}); kernel {cfg.model.kernel}, {cfg.model.dtype}, "
         f"config {cfg_source}", q)
    _say(f"mesh: {describe_mesh(mesh)}", q)

    # ---- estimator and optimiser: explicit, or chosen and reported
    from .config import make_optimizer, resolve_optimizer
    from .mll import choose_estimator

    mll_cfg = cfg.mll_config()
    estimator, est_reason = choose_estimator(n, mll_cfg)
    opt_name, opt_reason = resolve_optimizer(cfg.optim.optimizer, estimator)
    _say(f"estimator: {estimator} ({est_reason}); optimiser: {opt_name} ({opt_reason})", q)

    # ---- training
    epochs = cfg.train.epochs
    run_id = f"{name}-split{args.split}-seed{cfg.train.seed}"
    ckpt = Path(args.checkpoint) if args.checkpoint else REPO / "results" / "checkpoints" / (
        run_id + ".ckpt")
    if args.resume and not ckpt.exists():
        raise SystemExit(f"error: --resume: no checkpoint at {ckpt}; run without --resume first "
                         "(or pass --checkpoint PATH)")
    es = (EarlyStopping(cfg.train.patience, cfg.train.min_delta)
          if cfg.train.early_stopping else None)
    settings = {"config": {k: v for k, v in cfg.to_dict().items() if k != "predict"},
                "dataset": name, "split": args.split}
    settings["config"]["train"] = {k: v for k, v in settings["config"]["train"].items()
                                   if k != "epochs"}
    params0 = initial_params(cfg.train.init, d, dtype, cfg.train.seed)
    t_start = time.time()
    init_info = metric = None
    if cfg.train.init_subset and n > cfg.train.init_subset and not args.resume:
        from .train import subset_start

        params0, init_info = subset_start(
            X, y, params0, kernel=cfg.model.kernel, size=cfg.train.init_subset,
            seed=cfg.train.seed, noise_floor=cfg.model.noise_floor)
        metric = init_info.pop("metric")
        _say(f"start: exact fit on {init_info['size']} random rows ({init_info['evaluations']} "
             f"evaluations, {init_info['seconds']:.1f} s, loss {init_info['loss']:.4f})", q)
    optimizer = make_optimizer(cfg.optim, epochs, estimator)
    if metric is not None and isinstance(optimizer, LBFGS):
        # L-BFGS in the coordinates the subset's Hessian whitens (train.LBFGS.metric); a resumed
        # run takes them from its checkpoint
        optimizer = optimizer._replace(metric=metric)
    with _StopFlag(q) as stop:
        result = fit(
            X, y, kernel=cfg.model.kernel, backend=backend, mll_config=mll_cfg,
            optimizer=optimizer, epochs=epochs,
            params0=params0, converge_tol=cfg.train.converge_tol,
            seed=cfg.train.seed, early_stopping=es, checkpoint_path=ckpt,
            checkpoint_every=cfg.train.checkpoint_every, resume=args.resume,
            progress=False if q else None, log_every=cfg.train.log_every,
            callback=lambda rec, state: stop.signal is not None, settings=settings,
        )
    train_seconds = time.time() - t_start
    hist = result.history
    interrupted = stop.signal is not None
    params = result.params
    _say(f"stopped: {result.stopped_reason}", q)

    record = {
        "dataset": name,
        "split": args.split,
        "backend": bname,
        "backend_reason": reason,
        "mesh": mesh_record(mesh),
        "estimator": estimator,
        "estimator_reason": est_reason,
        "optimizer": opt_name,
        "optimizer_reason": opt_reason,
        "dtype": cfg.model.dtype,
        "kernel": cfg.model.kernel,
        "config": cfg.to_dict(),
        "config_source": cfg_source,
        "seed": cfg.train.seed,
        "versions": provenance.versions(),
        "machine": provenance.machine(),
        "commit": provenance.commit(),
        "command": sys.argv,
        "started": datetime.fromtimestamp(t_start, timezone.utc).isoformat(),
        "n_train": n,
        "n_test": int(split.X_test.shape[0]),
        "d": d,
        "checkpoint": str(ckpt),
        "stopped_reason": result.stopped_reason,
        # the subset fit the run started from ([train] init_subset), its seconds included in
        # train_seconds
        "init_subset": init_info,
        "complete": not interrupted and len(hist) > 0,
        "history": hist,
        # L-BFGS records the value at the parameters it returns; Adam the one entering its last
        # step
        "final_train_loss": hist[-1].get("new_loss", hist[-1]["loss"]) if hist else None,
        "seconds_per_epoch": (float(np.median([h["seconds"] for h in hist])) if hist else None),
        "train_seconds": train_seconds,
        "compile_seconds": result.info.get("compile_seconds"),
    }
    h = constrain(params, cfg.model.noise_floor)
    y_scale = float(split.y_std)
    record["hyperparameters"] = {
        "lengthscale": (np.asarray(h.lengthscale, np.float64) * np.asarray(split.x_std)).tolist(),
        "outputscale": float(h.outputscale) * y_scale**2,
        "noise": float(h.noise) * y_scale**2,
        "mean": float(params.mean) * y_scale + float(split.y_mean),
    }

    out = record_path(args.out, run_id)
    if interrupted:
        record["test_rmse"] = record["test_nll"] = None
        _write_json_atomic(out, record)
        # Always said, --quiet or not: the user must learn how to continue.
        print(f"interrupted by {stop.signal}: checkpoint {ckpt}, partial run record {out}; "
              "continue with the same command plus --resume", file=sys.stderr, flush=True)
        return 130

    # ---- prediction on the test split, in the target's units
    t0 = time.time()
    pc = cfg.predict
    pred_tol = pc.cg_tol
    Xp, yp, pp = X, y, params
    # the exact estimator's dense Cholesky also serves prediction (exact mean and variance)
    solver = "cholesky" if estimator == "exact" else "cg"
    if estimator == "exact" and dtype != jnp.float64:
        # The loss was computed in float64 because K is too ill-conditioned for float32 at
        # these hyperparameters (small n, noise near its floor); predict the same way.
        Xp, yp = X.astype(jnp.float64), y.astype(jnp.float64)
        pp = type(params)(*(jnp.asarray(a, jnp.float64) for a in params))
        pred_tol = min(pc.cg_tol, gpred.default_cg_tol(jnp.float64))
        _say("prediction in float64 (the exact estimator's precision)", q)
    Xt = jnp.asarray(split.X_test, Xp.dtype)
    alpha, info = gpred.mean_weights(
        Xp, yp, pp, backend=backend, noise_floor=cfg.model.noise_floor,
        precond_rank=max(cfg.mll.precond_rank, 15), tol=pred_tol, max_iter=pc.max_cg_iter,
        solver=solver)
    mean = gpred.predict_mean(Xt, Xp, alpha, pp, kernel=cfg.model.kernel,
                              noise_floor=cfg.model.noise_floor, batch_size=pc.batch_size)
    var = gpred.predict_variance(
        Xt, Xp, pp, backend=backend, method=pc.variance, noise_floor=cfg.model.noise_floor,
        precond_rank=max(cfg.mll.precond_rank, 15), tol=pred_tol, max_iter=pc.max_cg_iter,
        y=yp, love_rank=pc.love_rank, batch_size=pc.batch_size, solver=solver)
    mean = np.asarray(mean, np.float64) * y_scale + float(split.y_mean)
    var = np.asarray(var, np.float64) * y_scale**2
    y_test = np.asarray(split.y_test, np.float64) * y_scale + float(split.y_mean)
    err = y_test - mean
    rmse = float(np.sqrt(np.mean(err**2)))
    nll = float(np.mean(0.5 * np.log(2 * math.pi * var) + 0.5 * err**2 / var))
    record.update(
        test_rmse=rmse, test_nll=nll, predict_seconds=time.time() - t0,
        predict_cg_iterations=int(info.iterations),
        predict_cg_residual=float(np.max(np.asarray(info.residual))),
        variance_method=pc.variance if pc.variance != "auto" else gpred.choose_variance(n)[0],
        predict_solver=solver,
    )
    _write_json_atomic(out, record)
    if args.save_model:
        from .model import GPRegressor

        GPRegressor.from_fitted(
            X_train=split.X_train, y_train=split.y_train, params=params, split=split,
            config=cfg, backend=bname,
        ).save(args.save_model)
        _say(f"model saved to {args.save_model}", q)

    print(f"test RMSE {rmse:.4f}   test NLL {nll:.4f}   final train loss "
          f"{record['final_train_loss']:.4f}   {record['seconds_per_epoch']:.2f} s/epoch "
          f"({len(hist)} epochs, {train_seconds:.0f} s training, "
          f"{record['predict_seconds']:.0f} s prediction)")
    print(f"run record: {out}")
    return 0


def cmd_datasets(args) -> int:
    """`gpadjoint datasets`: one line per data set."""
    from .data import list_datasets

    rows = list_datasets()
    print(f"{'name':16s} {'n':>8s} {'d':>4s}  {'splits':>6s}  shipped")
    for r in rows:
        print(f"{r['name']:16s} {r['n']:8d} {r['d']:4d}  {r['n_splits']:6d}  "
              f"{'yes' if r['shipped'] else 'no (gpadjoint.data.download_dataset)'}")
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
    f.add_argument("--seed", type=int)
    f.add_argument("--scale-y", action=argparse.BooleanOptionalAction, default=None,
                   help="scale targets to unit variance (default: the config's model.scale_y)")
    f.add_argument("--out", help="run-record JSON file, or a directory to write "
                   "<run>-<time>.json into (default results/runs/)")
    f.add_argument("--checkpoint", help="checkpoint file (default results/checkpoints/<run>.ckpt)")
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
