"""The ``gpadjoint`` command line: ``fit``, ``predict`` and ``datasets``.

Data flow: model -> **cli** -> results. ``gpadjoint fit --dataset elevators`` loads a shipped UCI
split, fits the hyperparameters with the configured estimator, reports test RMSE and NLL in the
target's units, and writes a JSON run record with full provenance under ``results/runs/`` of the
current working folder (checkpoints under ``results/checkpoints/``), wherever gpadjoint is
installed.
SIGINT/SIGTERM during a fit stop it within one loss evaluation: the step in progress (an L-BFGS
line search, or a rung of the subset start) is abandoned, the last accepted point is
checkpointed and a partial run record written; ``--resume`` continues from the checkpoint (or
from the subset start's, ``<checkpoint>.start``, when the full fit had not yet written one) and
ends where an uninterrupted run ends.

Faults around a run get one line on stderr, never a traceback. Every output path (the record,
the checkpoint, ``--save-model``, ``predict --out``) is checked before any work
(:func:`gpadjoint._io.check_writable`). A write that fails later (no space, a size limit,
permissions, ...) says what was being written, where and why, what is still safe and the exact
``--resume`` command that continues; a run record that cannot be written goes to stderr as one
JSON line so the result is not lost. A damaged or foreign checkpoint or model file is named.

Exit codes: 0 done; 2 bad input or a damaged file (:data:`EXIT_ERROR`); 73 an output refused
before any work (:data:`EXIT_UNWRITABLE`); 74 a write failed during the run
(:data:`EXIT_WRITE_FAILED`); 130 stopped by SIGINT/SIGTERM (:data:`EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from . import provenance
from ._io import UnwritablePath, WriteError, atomic_write, check_writable

EXIT_ERROR = 2  # bad input, or a damaged / foreign file we wrote
EXIT_UNWRITABLE = 73  # an output path refused before any work (sysexits' EX_CANTCREAT)
EXIT_WRITE_FAILED = 74  # a write failed during the run (sysexits' EX_IOERR)
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: checkpoint and partial record written


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def _load_run_config(path: str | None):
    from .config import default_config, load_config

    if path:
        return load_config(path), str(path)
    return default_config(), "gpadjoint/default.toml (packaged defaults)"


def _write_json_atomic(path: Path, obj, what: str = "run record") -> None:
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1, default=_json_default),
                 binary=False, what=what)


def _error(msg: str) -> None:
    """Print ``msg`` as one ``error:`` line on stderr (inner line breaks folded)."""
    print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)


def _command(argv: list[str], *add: str) -> str:
    """Return the shell command that reruns ``gpadjoint argv`` plus the flags ``add``."""
    return shlex.join(["gpadjoint", *argv, *(a for a in add if a not in argv)])


def _file_state(path: Path):
    """``(size, mtime_ns)`` of a file, or None: tells whether this run wrote it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _still_safe(ckpt: Path, ours: bool, argv: list[str]) -> str:
    """Say what survives a failed write, and the exact command that continues from it."""
    from .checkpoint import checkpoint_epoch

    epoch = None
    if ours:
        try:
            epoch = checkpoint_epoch(ckpt)
        except (OSError, ValueError):
            epoch = None
    if epoch is None:
        return ("No checkpoint of this run was written; once fixed, run again: "
                + _command(argv))
    return (f"Still safe: the last good checkpoint {ckpt} (epoch {epoch}); once fixed, "
            f"continue with: {_command(argv, '--resume')}")


def _resumed_from(ckpt: Path) -> str:
    """Name the checkpoint ``--resume`` continues from (the run's, else its subset start's)."""
    from .checkpoint import checkpoint_epoch, start_path

    if ckpt.exists():
        return f"checkpoint {ckpt} (epoch {checkpoint_epoch(ckpt)})"
    return f"the subset start's checkpoint {start_path(ckpt)} (the full fit had not begun)"


def _interrupted_safe(ckpt: Path, argv: list[str]) -> str:
    """Say which checkpoint an interrupted run left and the command that continues from it."""
    from .checkpoint import start_path

    if ckpt.exists() or start_path(ckpt).exists():
        return f"{_resumed_from(ckpt)}; continue with: {_command(argv, '--resume')}"
    return f"no checkpoint was written yet ({ckpt}); run again: {_command(argv)}"


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
    """SIGINT/SIGTERM handler: the first signal asks the fit to stop before its next evaluation.

    Called, it answers whether a stop was asked (the ``stop`` hook of ``GPRegressor.fit``).
    """

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
        print(f"\n{self.signal} received: stopping after the evaluation in progress and "
              "checkpointing the last accepted point (send it again to abort at once)",
              file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.signal is not None

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


def _run_name(args) -> str:
    """Return the data's name in the run id (checking that one source of data is named)."""
    if args.dataset and args.data:
        raise SystemExit("error: give either --dataset NAME or --data FILE.csv, not both")
    if args.dataset:
        return args.dataset
    if args.data:
        if not args.target:
            raise SystemExit("error: --data FILE.csv needs --target COLUMN (the column to predict)")
        return Path(args.data).stem
    raise SystemExit("error: say what to fit: --dataset NAME (see `gpadjoint datasets`) "
                     "or --data FILE.csv --target COLUMN")


def _load_split(args, cfg):
    """Return the shipped split or the user's CSV the command names."""
    from . import data as gdata
    from . import datasets as gdatasets

    if args.dataset:
        return gdatasets.load_dataset(args.dataset, args.split,
                                      scale_y=cfg.model.normalize_y)
    return gdata.load_csv(args.data, args.target, test_fraction=args.test_fraction,
                          seed=cfg.train.random_state, scale_y=cfg.model.normalize_y)


def _preflight(args, ckpt: Path, out: Path) -> None:
    """Refuse, before any work, an unwritable output or a checkpoint that cannot be resumed.

    Raises UnwritablePath or ReadError, each naming the path.
    """
    from .checkpoint import checkpoint_epoch, read_start, start_path

    check_writable(out, "run record")
    check_writable(ckpt, "checkpoint")
    if args.save_model:
        check_writable(args.save_model, "model file")
    if args.resume:
        start = start_path(ckpt)
        if ckpt.exists():
            checkpoint_epoch(ckpt)  # a damaged or foreign file is named now, not after loading
        elif start.exists():
            read_start(start)  # the run stopped in its subset start: that is resumed
        else:
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt} (nor {start.name} of a "
                             "subset start beside it); run without --resume first (or pass "
                             "--checkpoint PATH)")


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
        # every "auto" of the config as resolved for this fit, with its reason (gpadjoint.plan)
        "plan": model.plan_.to_dict(),
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
    from .predict import scores

    t0 = time.time()
    mean, std = model.predict(X_test, return_std=True)
    rmse, nll = scores(y_test, mean, std**2)
    solve = model.solve_info_
    return dict(
        test_rmse=rmse,
        test_nll=nll,
        predict_seconds=solve["seconds"] + time.time() - t0,
        predict_cg_iterations=solve["iterations"], predict_cg_residual=solve["residual"],
        variance_method=model.variance_, predict_solver=model.solver_,
        posterior=model.posterior_, posterior_reason=model.posterior_reason_,
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
        model__backend=args.backend, model__precision=args.precision, model__dtype=args.dtype,
        model__kernel=args.kernel,
        model__normalize_y=args.normalize_y, train__epochs=args.epochs, optim__lr=args.lr,
        train__random_state=args.random_state,
    )
    q = args.quiet
    argv = getattr(args, "argv", sys.argv[1:])

    # ---- every output path, before any work
    name = _run_name(args)
    run_id = f"{name}-split{args.split}-seed{cfg.train.random_state}"
    ckpt = Path(args.checkpoint) if args.checkpoint else (
        Path.cwd() / "results" / "checkpoints" / (run_id + ".ckpt"))
    out = record_path(args.out, run_id)
    _preflight(args, ckpt, out)

    split = _load_split(args, cfg)
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
    if args.resume:
        _say(f"resuming from {_resumed_from(ckpt)}", q)
    model = GPRegressor(config=cfg, devices=args.devices, verbose=not q)
    t_start = time.time()
    before = _file_state(ckpt)
    try:
        with _StopFlag(q) as stop:
            model.fit(
                X_train, y_train, checkpoint=ckpt, resume=args.resume, stop=stop,
                settings={"dataset": name, "split": args.split},
                progress=False if q else "auto",
            )
    except WriteError as err:  # a checkpoint write failed; the previous one is intact
        ours = args.resume or _file_state(ckpt) != before
        _error(f"{err}. {_still_safe(ckpt, ours, argv)}")
        return EXIT_WRITE_FAILED
    record = _run_record(model, cfg, cfg_source, t_start, name=name, split=args.split,
                         n_test=int(X_test.shape[0]), checkpoint=ckpt,
                         interrupted=stop.signal is not None)
    interrupted = stop.signal is not None

    if interrupted:
        record["test_rmse"] = record["test_nll"] = None
        if not _write_record(out, record, ckpt, argv):
            return EXIT_WRITE_FAILED
        # Always said, --quiet or not: the user must learn how to continue.
        print(f"interrupted by {stop.signal} ({model.stopped_reason_}): "
              f"{_interrupted_safe(ckpt, argv)}; partial run record {out}",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED

    # ---- prediction on the test split, in the target's units
    return _predict_and_report(args, model, record, X_test, y_test, out=out, ckpt=ckpt,
                               argv=argv)


def _predict_and_report(args, model, record, X_test, y_test, *, out, ckpt, argv) -> int:
    """Score the fitted model on the test split, write the record (and model); -> exit code."""
    q, cfg, hist = args.quiet, model.config_, model.history_
    resume = _command(argv, "--resume")
    if model.predict_dtype_ != cfg.model.dtype:
        _say(f"prediction in {model.predict_dtype_} (the exact estimator's precision)", q)
    record.update(_test_scores(model, X_test, y_test))
    rmse, nll = record["test_rmse"], record["test_nll"]
    written = _write_record(out, record, ckpt, argv)
    if args.save_model:
        try:
            model.save(args.save_model)
        except WriteError as err:
            kept = f"the run record {out} and " if written else ""
            _error(f"{err}. Still safe: {kept}the checkpoint {ckpt}; once fixed (or with "
                   f"another --save-model), save it with: {resume}")
            return EXIT_WRITE_FAILED
        _say(f"model saved to {args.save_model}", q)
    if not written:
        return EXIT_WRITE_FAILED

    if hist:
        trained = (f"final train loss {record['final_train_loss']:.4f}   "
                   f"{record['seconds_per_epoch']:.2f} s/epoch ({len(hist)} epochs, ")
    else:  # full_fit kept the subset start (or epochs = 0): no step on all n
        trained = "no full-n step (" + model.stopped_reason_.split(":")[0] + ", "
    print(f"test RMSE {_num(rmse)}   test NLL {_num(nll)}   {trained}"
          f"{model.fit_seconds_:.0f} s training, {record['predict_seconds']:.0f} s prediction)")
    print(f"run record: {out}")
    return 0


def _write_record(out: Path, record: dict, ckpt: Path, argv: list[str]) -> bool:
    """Write the run record; return whether it was written.

    If that fails, say so in one line and print the record to stderr as one JSON line, so the
    result is not lost.
    """
    try:
        _write_json_atomic(out, record)
        return True
    except WriteError as err:
        _error(f"{err}. The record follows on stderr as one JSON line; the checkpoint {ckpt} "
               f"is safe; once fixed (or with another --out), write the record with: "
               f"{_command(argv, '--resume')}")
        print(json.dumps(record, default=_json_default), file=sys.stderr, flush=True)
        return False


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

    if args.out:
        check_writable(args.out, "predictions")
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
        try:
            atomic_write(args.out, lambda fh: out.to_csv(fh, index=False), binary=False,
                         what="predictions")
        except WriteError as err:
            _error(f"{err}. Nothing else was written; once fixed (or with another --out), "
                   f"run again: {_command(getattr(args, 'argv', sys.argv[1:]))}")
            return EXIT_WRITE_FAILED
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
    f.add_argument("--backend", choices=["auto", "dense", "stored", "blocked", "keops"])
    f.add_argument("--precision", choices=["full", "mixed"],
                   help="the blocked backend's kernel entries in the working dtype (full) or in "
                   "float32 (mixed); default: the config's model.precision")
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

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # to print the exact command that continues after a fault
    try:
        with jax.enable_x64(True):  # float64 runs and the exact estimator; scoped to this call
            return args.func(args)
    except UnwritablePath as e:
        _error(e)
        return EXIT_UNWRITABLE
    except WriteError as e:
        _error(e)
        return EXIT_WRITE_FAILED
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        _error(e)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
