"""gpadjoint against GPyTorch on the paper's UCI benchmarks, side by side on this machine.

One JSON record per (data set, split, method, backend, epochs) under ``results/uci/``; finished
records are skipped, so a stopped batch resumes where it stopped. Each run is its own child
process (its peak RSS is its own; a crash loses one run). A run also resumes: both methods
checkpoint every epoch (model, optimiser state and random state) next to its record
(``<record>.ckpt.npz`` / ``.ckpt.pt``), and a killed run, rerun with the same command,
continues from its last finished epoch along the same trajectory, so a run longer than a
working session (GPyTorch's 75 epochs on kin40k: ~3.75 h here) is done in pieces. Each piece
is listed in the record's ``segments`` (first epoch, start time, load), and the timings are
per epoch, so time to quality stays the sum of training seconds.

Each record gives ``fit_seconds``, ``predict_seconds`` and ``total_seconds`` (their sum) over
every session the run took: a run longer than a working session is killed at its end and
continues from its checkpoint when the same command is run again (bench_uci passes
``--resume`` to ``gpadjoint fit`` itself); each process's wall clock is kept beside the
checkpoint while it runs (``_benchutil.SessionClock``), and the record says how many sessions
there were (``sessions``, ``session_seconds``) and what the fit's time was made of (``cost``:
evaluations, passes and CG iterations per evaluation).

Both methods see the same official split and preprocessing (inputs z-scored with training
statistics, targets centred, not scaled), the same model (constant mean, output scale x
Matern-3/2 ARD, noise > 1e-4, softplus), the same initial raw values (N(0, 1) drawn by
``gpadjoint.start.initial_params("normal", d, float32, seed)``), Adam at lr 0.05 and the same
number of epochs, in float32.

* gpadjoint-paper: ``gpadjoint fit --config configs/paper.toml --backend B`` (SLQ depth 10, 10
  Rademacher probes, rank-15 pivoted-Cholesky CG, min 10 CG steps, tolerance 1.0).
* GPyTorch: ExactGP with the paper's settings, pinned below and written into each record, with
  ``max_cholesky_size(0)`` so that its iterative path runs; ``backend=keops`` uses
  ``gpytorch.kernels.keops.MaternKernel``. Prediction with GPyTorch's default settings (LOVE via
  ``fast_pred_var`` for the KeOps backend, where exact variances would take hours here).

After training, both methods' final hyperparameters are scored by one common evaluator,
:func:`gpadjoint.evaluate.exact_loss` (float64 Cholesky where it fits, else deep SLQ), stored
as ``final_train_loss_common`` next to each method's own last estimate ``final_train_loss``.

    python scripts/bench_uci.py --datasets elevators --splits 0 1 2 --backends dense
    python scripts/bench_uci.py --datasets elevators --splits 0 --backends keops --epochs 10
    python scripts/bench_uci.py --datasets kin40k --splits 0 --backends blocked keops --epochs 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
from gpytorch_baseline import (  # noqa: E402,F401 (the baseline's settings, re-exported)
    GPYTORCH_SETTINGS,
    NOISE_FLOOR,
    run_gpytorch,
)

from gpadjoint.checkpoint import start_path  # noqa: E402

OUT_DIR = bu.ROOT / "results" / "uci"
DATASETS = ["elevators", "protein", "kin40k", "keggdirected", "keggundirected"]
# Each gpadjoint method is a base config and RunConfig.with_overrides keys on top of it.
# gpadjoint-paper: configs/paper.toml, the paper's settings (float32 Adam, SLQ depth 10, 10
# probes, rank-15 CG to tolerance 1). gpadjoint-plogdet: that with the log det preconditioned,
# i.e. SLQ on P^{-1/2} K P^{-1/2} with the same rank-15 preconditioner the CG (and GPyTorch)
# uses. gpadjoint-deep: that, with Lanczos depth 20 and CG to 1e-3 (not the paper's settings: a
# more accurate estimator at about twice the passes; the one found nearly unbiased on
# elevators). gpadjoint-matched: the paper's depth, probes and rank with the two things
# GPyTorch's estimator does beyond the paper's: the log det preconditioned by the CG's own
# pivoted Cholesky, and CG to a real tolerance, 1e-2 on the solve's relative residual
# (GPyTorch's cg_tolerance(1.0) is tested against the *mean* relative residual over the solve
# and the probe columns, so its CG runs 20-27 iterations late in a kin40k run, while the paper's
# tolerance 1 stops ours at its 10-iteration minimum and biases the gradient).
# gpadjoint-default: `gpadjoint fit` as shipped (gpadjoint/default.toml); only the split and seed
# are the benchmark's. gpadjoint-adam: the previous default, default.toml with Adam (lr 0.1,
# 100 epochs) and the estimator settings it had before L-BFGS became the default.
PAPER, DEFAULT = "configs/paper.toml", "gpadjoint/default.toml"
METHODS = {
    "gpadjoint-paper": (PAPER, {}),
    "gpytorch": (None, {}),
    "gpadjoint-plogdet": (PAPER, {"mll__precond_logdet": True}),
    "gpadjoint-deep": (PAPER, {"mll__precond_logdet": True, "mll__lanczos_depth": 20,
                               "mll__cg_tol": 1e-3}),
    "gpadjoint-matched": (PAPER, {"mll__precond_logdet": True, "mll__cg_tol": 1e-2}),
    "gpadjoint-default": (DEFAULT, {}),
    "gpadjoint-adam": (DEFAULT, {"optim__optimizer": "adam", "train__epochs": 100,
                                 "model__dtype": "float32", "train__init_subset": 0,
                                 "mll__cg_tol": 1e-2, "mll__cg_min_iter": 10,
                                 "mll__lanczos_depth": 10, "mll__precond_rank": 30,
                                 "mll__num_probes": 10}),
}
BACKENDS = ["dense", "stored", "blocked", "keops"]
# "blocked" (row tiles of K built on the fly, O(n * tile) memory) is gpadjoint's fast CPU path
# when K does not fit in memory (kin40k and larger here). GPyTorch has no counterpart: without
# KeOps it materialises K and its autograd keeps about ten n x n float32 buffers (9.1 GB measured
# at n = 14 940, so ~52 GB at kin40k's 36 000). Its O(n)-memory path is KeOps, and bench_epoch
# pairs a gpadjoint "blocked" run with GPyTorch's "keops" run, labelled as such; likewise
# "stored" (K held once, no n x n gradient), which also runs where GPyTorch's dense path would not.
GPYTORCH_BACKENDS = ["dense", "keops"]
KERNEL = "matern32"
# the program each run's child process executes (`CHILD_SCRIPT --child SPEC`)
CHILD_SCRIPT = Path(__file__)
def record_path(out_dir: Path, ds: str, split: int, method: str, backend: str, epochs: int):
    return out_dir / f"{ds}-split{split}-{method}-{backend}-{epochs}ep.json"


def checkpoint_path(record: Path, method: str) -> Path:
    """Where a run's per-epoch checkpoint lives while it is unfinished (beside its record)."""
    return record.with_suffix(".ckpt.pt" if method == "gpytorch" else ".ckpt.npz")


# --------------------------------------------------------------------------------------------
# child: one run


def method_config(method: str, epochs: int | None = None):
    """Return the :class:`RunConfig` of gpadjoint method ``method`` (base file + overrides).

    Every method also checkpoints after each epoch (which does not change the result), so that
    a killed run resumes; ``epochs`` replaces the base's epoch count.
    """
    from gpadjoint.config import default_config, load_config

    base, over = METHODS[method]
    if base is None:
        raise ValueError(f"{method!r} is not a gpadjoint method")
    cfg = default_config() if base == DEFAULT else load_config(bu.ROOT / base)
    return cfg.with_overrides(**over).with_overrides(train__checkpoint_every=1,
                                                     train__epochs=epochs)


def method_source(method: str) -> str:
    """Say where a method's config comes from: its base file and the overrides on top."""
    base, over = METHODS[method]
    return base + (" + " + ", ".join(f"{k}={v!r}" for k, v in over.items()) if over else "")


def run_gpadjoint(spec: dict) -> dict:
    from gpadjoint import cli

    with tempfile.TemporaryDirectory(prefix="gpadj_uci_") as tmp:
        out = Path(tmp) / "run.json"
        config = Path(tmp) / f"{spec['method']}.toml"
        config.write_text(bu.config_toml(method_config(spec["method"]).to_dict()))
        ckpt = Path(spec["checkpoint"]) if spec.get("checkpoint") else Path(tmp) / "ckpt.npz"
        # the full fit's checkpoint, or the subset start's alone (killed before the fit began)
        resume = ckpt.exists() or start_path(ckpt).exists()
        resumed_from = (int(np.load(ckpt)["epoch"]) if ckpt.exists() else 0) if resume else None
        segments = bu.begin_segment(ckpt if spec.get("checkpoint") else None, resumed_from or 0)
        if spec.get("checkpoint"):  # every evaluation, so that a timeout says what bounded it
            if not resume:  # a run started over starts its log over
                bu.evaluations_path(ckpt).unlink(missing_ok=True)
            bu.log_evaluations(bu.evaluations_path(ckpt))
        argv = [
            "fit",
            "--dataset",
            spec["dataset"],
            "--split",
            str(spec["split"]),
            "--config",
            str(config),
            "--backend",
            spec["backend"],
            "--epochs",
            str(spec["epochs"]),
            "--random-state",
            str(bu.seed_for(spec["split"])),
            "--quiet",
            "--out",
            str(out),
            "--checkpoint",
            str(ckpt),
        ] + (["--resume"] if resume else [])
        t0 = time.perf_counter()
        rc = cli.main(argv)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(
                f"gpadjoint fit exited with {rc}"
                + (f" resuming from {ckpt} (delete it and its .segments and .sessions files "
                   "to start over)" if resume else ""))
        rec = json.loads(out.read_text())
    s = bu.load_split(spec["dataset"], spec["split"])
    hist = rec["history"]
    # The history is in the run's internal units: targets divided by their std when the config
    # scales them (gpadjoint/default.toml); the curves below are in the benchmark's units
    # (centred, not scaled), as every other record's.
    ys = 1.0
    if rec["config"]["model"]["normalize_y"]:
        from gpadjoint.data import normalisation

        ys = float(normalisation(s.X_train, s.y_train, True)[3])
    shift = math.log(ys)  # -log p(y) / n = -log p(y / ys) / n + log ys
    hist = [h | {"outputscale": h["outputscale"] * ys**2, "noise": h["noise"] * ys**2,
                 "mean": h["mean"] * ys, "loss": h["loss"] + shift} for h in hist]
    # the record gives hyperparameters in the data's units; the common evaluator works on the
    # standardised training data both methods trained on
    final = bu.split_units(rec["hyperparameters"], s)
    return {
        # what ran, resolved: the settings from the run's own config and fitted model (never
        # constants), the full config beside them
        "settings": bu.run_settings(rec["config"], rec["n_train"], estimator=rec["estimator"],
                                    optimizer=rec["optimizer"]) | {
            "config": rec["config"],
            "config_source": method_source(spec["method"]),
            "backend_reason": rec["backend_reason"],
        },
        "epochs_run": len(hist),
        "loss_curve": [h["loss"] for h in hist],
        "seconds_curve": [h["seconds"] for h in hist],
        "hyper_curve": [
            {k: h[k] for k in ("lengthscale", "outputscale", "noise", "mean")} for h in hist
        ],
        "cg_iterations_curve": [h["cg_iterations"] for h in hist],
        # relative residual |r - K alpha| / |r| of each epoch's solve: the paper's CG stops
        # after 10 iterations, and how accurate that leaves alpha drives the gradient's bias
        "cg_residual_curve": [h.get("cg_residual") for h in hist],
        "passes_curve": [h.get("passes") for h in hist],
        # L-BFGS: loss evaluations per step (line search included); absent for Adam
        "evaluations_curve": [h.get("evaluations") for h in hist],
        "stopped_reason": rec.get("stopped_reason"),
        "final_hyperparameters": final,
        # None when no full-n step ran (full_fit kept the subset start: no estimate at all n)
        "final_train_loss": (None if rec["final_train_loss"] is None
                             else rec["final_train_loss"] + shift),
        "full_fit": rec.get("full_fit"),
        "seconds_per_epoch": rec["seconds_per_epoch"],
        "train_seconds": rec["train_seconds"],
        "compile_seconds": rec.get("compile_seconds"),
        # the exact subset fit the run started from ([train] init_subset), before its epochs
        "init_seconds": (rec.get("init_subset") or {}).get("seconds", 0.0),
        "init_subset": rec.get("init_subset"),
        "test_rmse": rec["test_rmse"],
        "test_nll": rec["test_nll"],
        "predict_seconds": rec["predict_seconds"],
        "predict_method": rec.get("variance_method"),
        "total_wall_seconds": wall,
        "n_train": rec["n_train"],
        "d": rec["d"],
        "resumed_from_epoch": resumed_from,
        "segments": segments,
    }


def common_loss(spec: dict, final: dict) -> dict:
    from gpadjoint.evaluate import exact_loss

    s = bu.load_split(spec["dataset"], spec["split"])
    out = exact_loss(s.X_train, s.y_train, kernel=KERNEL, **final)
    return {
        "final_train_loss_common": out["loss"],
        "common_evaluator": {k: v for k, v in out.items() if k != "loss"},
    }


def common_predict(spec: dict, final: dict, variance: bool = True) -> dict:
    """Score given hyperparameters on the test split with gpadjoint's predictor.

    As ``gpadjoint fit`` predicts with configs/paper.toml: PCG mean to 1e-2, variance by the
    automatic method. Only used when a method's own prediction crashed, so that its fit is
    still scored.
    """
    import jax.numpy as jnp

    from gpadjoint import predict as gpred
    from gpadjoint.kernels import unconstrain
    from gpadjoint.matvec import choose_backend, make_backend

    s = bu.load_split(spec["dataset"], spec["split"])
    X = jnp.asarray(s.X_train, jnp.float32)
    y = jnp.asarray(s.y_train, jnp.float32)
    p = unconstrain(final["lengthscale"], final["outputscale"], final["noise"], final["mean"],
                    noise_floor=NOISE_FLOOR, dtype=jnp.float32)
    bname, why = choose_backend(X.shape[0], jnp.float32, d=X.shape[1], rank=15)
    be = make_backend(bname, KERNEL)
    t0 = time.perf_counter()
    alpha, info = gpred.mean_weights(X, y, p, backend=be, noise_floor=NOISE_FLOOR,
                                     precond_rank=15, tol=1e-2, max_iter=1000)
    Xt = jnp.asarray(s.X_test, jnp.float32)
    mean = gpred.predict_mean(Xt, X, alpha, p, kernel=KERNEL, noise_floor=NOISE_FLOOR,
                              batch_size=1024)
    if not variance:  # the mean alone: RMSE, no NLL
        rmse = float(np.sqrt(np.mean((np.asarray(s.y_test, np.float64)
                                      - np.asarray(mean, np.float64)) ** 2)))
        return {"test_rmse": rmse, "test_nll": None,
                "predict_seconds": time.perf_counter() - t0,
                "predict_backend": f"{bname} ({why}); mean only"}
    var = gpred.predict_variance(Xt, X, p, backend=be, method="auto", noise_floor=NOISE_FLOOR,
                                 precond_rank=15, tol=1e-2, max_iter=1000, y=y, love_rank=100,
                                 batch_size=1024)
    rmse, nll = bu.predictive_scores(np.asarray(s.y_test), np.asarray(mean), np.asarray(var))
    return {"test_rmse": rmse, "test_nll": nll, "predict_seconds": time.perf_counter() - t0,
            "predict_backend": f"{bname} ({why})"}


def _earlier_common_loss(spec: dict, res: dict) -> dict | None:
    """Return the common evaluator's result from an earlier attempt at this run, if any.

    A session's end kills the batch and its child alike, so nothing recovers the run then; its
    progress file stays behind at the stage the child had reached. When that stage is the
    prediction, the common evaluator had finished for these very hyperparameters (on
    keggundirected it takes more than an hour), and the resumed run takes its result rather than
    computing it again. It is labelled as reused.
    """
    path = Path(spec["progress"]) if spec.get("progress") else None
    if path is None or not path.exists():
        return None
    part = json.loads(path.read_text())
    same = json.loads(json.dumps(res["final_hyperparameters"], default=float))
    if (part.get("stage") != "predict" or part.get("epochs_run") != res["epochs_run"]
            or part.get("final_hyperparameters") != same
            or part.get("final_train_loss_common") is None):
        return None
    print(f"  common evaluator: reusing the result saved in {path.name}", file=sys.stderr,
          flush=True)
    return {"final_train_loss_common": part["final_train_loss_common"],
            "common_evaluator": part["common_evaluator"] | {"reused_from_progress": True}}


def child(spec: dict) -> dict:
    t0 = time.time()
    if spec.get("common_predict"):
        return common_predict(spec, spec["common_predict"])
    # this process's share of the run's wall clock, kept beside the checkpoint while it runs
    clock = bu.SessionClock(spec.get("checkpoint"))
    clock.stage("run")

    def after_train(res):
        kept_start = (res.get("full_fit") or {}).get("fit") is False  # no full-n estimate
        if spec.get("common", True) and (res["final_train_loss"] is not None or kept_start):
            clock.stage("common")
            res.update(_earlier_common_loss(spec, res)
                       or common_loss(spec, res["final_hyperparameters"]))
            clock.stage("run")
        bu.save_progress(spec, res | {"stage": "predict"})

    if spec["method"] == "gpytorch":
        res = run_gpytorch(spec, after_train)
        if spec.get("skip_own_predict"):
            # the mean only (RMSE; no NLL): LOVE variances cost ~100 more passes at kin40k
            res.update(common_predict(spec, res["final_hyperparameters"], variance=False))
            res["predict_method"] = (
                "gpadjoint's predictor on this run's final hyperparameters, mean only (no NLL; "
                f"GPyTorch's own prediction skipped: {spec['skip_own_predict']})")
    else:
        res = run_gpadjoint(spec)
        after_train(res)
    res.update(run_seconds(spec["method"], res, clock.earlier(), clock.stop()))
    res["child_seconds"] = time.time() - t0
    res["peak_rss_mib"] = bu.peak_rss_mib()
    return res


def run_seconds(method: str, res: dict, earlier: dict, sessions: list[dict]) -> dict:
    """Return a record's time account: fit, predict and total seconds over every session.

    ``earlier``: seconds per stage of the processes before this one (a run killed at a working
    session's end continues from its checkpoint in the next command); ``sessions``: every
    process's entry (:class:`_benchutil.SessionClock`), this one last.

    gpadjoint: ``fit_seconds`` is this process's ``gpadjoint fit`` wall clock less its
    prediction, plus the whole "run" stage of every earlier process (its fit, and any
    prediction it began before it was killed: that time was spent on this run too).
    GPyTorch: its ``train_seconds``, which its checkpoint already sums over the sessions'
    finished epochs. ``total_seconds`` = fit + predict; the common evaluator's seconds (a
    benchmark measurement, not part of the run) are ``common_seconds``, summed the same way.
    """
    if method == "gpytorch":
        fit = res["train_seconds"]
    else:
        fit = earlier.get("run", 0.0) + res["total_wall_seconds"] - res["predict_seconds"]
    this_common = sessions[-1]["seconds"].get("common", 0.0)
    common = earlier.get("common", 0.0) + this_common
    return {
        "fit_seconds": fit,
        "predict_seconds": res["predict_seconds"],
        "total_seconds": fit + res["predict_seconds"],
        "common_seconds": common if common > 0 else None,
        "sessions": len(sessions),
        "session_seconds": sessions,
        # what the fit's time was made of (None for GPyTorch, whose curves count no passes
        # per evaluation): evaluations, passes and CG iterations per evaluation
        "cost": None if method == "gpytorch" else bu.run_cost(res),
    }


# --------------------------------------------------------------------------------------------
# parent: the batch


def _recover(spec: dict, res: dict, progress: Path, timeout: float) -> dict:
    """Keep what a crashed run finished: its training (and common loss) from the progress file.

    A crash after training and the common evaluator (in the method's own prediction: GPyTorch's
    KeOps/LOVE prediction segfaulted on kin40k) keeps the run as ok, scores its final
    hyperparameters with gpadjoint's predictor instead, and says so in ``predict_method``. A
    crash during training keeps the epochs done under the failed status.
    """
    if res.get("status", "ok") == "ok" or not progress.exists():
        progress.unlink(missing_ok=True)
        return res
    part = json.loads(progress.read_text())
    progress.unlink()
    stage = part.pop("stage", "train")
    if stage != "predict":
        return part | {"status": f"{res['status']} (during training; partial curves kept)"}
    pred = bu.run_child(CHILD_SCRIPT, spec | {"common_predict": part["final_hyperparameters"]},
                        timeout)
    return part | pred | {
        "status": "ok" if pred.get("status", "ok") == "ok" else pred["status"],
        "own_predict_status": res["status"],
        "predict_method": f"gpadjoint's predictor on this run's final hyperparameters (the "
                          f"method's own prediction crashed: {res['status']})",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=DATASETS)
    ap.add_argument("--splits", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS)[:2], choices=list(METHODS))
    ap.add_argument("--backends", nargs="+", default=["dense"], choices=BACKENDS)
    ap.add_argument("--epochs", type=int, default=75)
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--timeout", type=float, default=2 * 3600, help="seconds per run")
    ap.add_argument(
        "--no-common", action="store_true", help="skip the common evaluator (for smoke tests)"
    )
    ap.add_argument(
        "--skip-gpytorch-predict", metavar="REASON",
        help="score GPyTorch's fit with gpadjoint's predictor instead of GPyTorch's own "
             "prediction, recording REASON (e.g. it crashed on this data set before)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec), default=float))
        return 0

    if args.epochs <= 0:
        ap.error(f"--epochs must be positive, got {args.epochs}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for ds in args.datasets:
        for split in args.splits:
            for backend in args.backends:
                for method in args.methods:
                    if method == "gpytorch" and backend not in GPYTORCH_BACKENDS:
                        print(f"skip: GPyTorch has no {backend!r} backend (its O(n)-memory path "
                              f"is 'keops'; bench_epoch pairs the two)")
                        continue
                    path = record_path(out_dir, ds, split, method, backend, args.epochs)
                    if path.exists() and json.loads(path.read_text()).get("status") == "ok":
                        print(f"skip (done): {path.name}")
                        continue
                    spec = {
                        "dataset": ds,
                        "split": split,
                        "method": method,
                        "backend": backend,
                        "epochs": args.epochs,
                        "common": not args.no_common,
                    }
                    if method == "gpytorch" and args.skip_gpytorch_predict:
                        spec["skip_own_predict"] = args.skip_gpytorch_predict
                    print(f"run: {path.name}", flush=True)
                    started = datetime.now(timezone.utc).isoformat()
                    load_before = bu.load_avg()
                    commit = bu.git_commit()  # the code the child imports, not what HEAD is after
                    progress = path.with_suffix(".progress")
                    ckpt = checkpoint_path(path, method)
                    for side in (ckpt, start_path(ckpt)):
                        if side.exists():
                            print(f"  resuming from {side.name}", flush=True)
                            break
                    res = bu.run_child(CHILD_SCRIPT, spec | {"progress": str(progress),
                                                                "checkpoint": str(ckpt)},
                                       args.timeout)
                    res = _recover(spec, res, progress, args.timeout)
                    rec = {
                        **spec,
                        "seed": bu.seed_for(split),
                        "kernel": KERNEL,
                        "started": started,
                        "load_avg_before": load_before,
                        "load_avg_after": bu.load_avg(),
                        "commit": commit,
                        "machine": bu.machine(),
                        "versions": bu.versions(),
                        "script": "scripts/bench_uci.py",
                        **res,
                    }
                    rec.setdefault("status", "ok")
                    if method != "gpytorch":  # every session's evaluations, by training size
                        rec["evaluations_log"] = bu.evaluations_summary(bu.evaluations_path(ckpt))
                    if rec["status"] != "ok":
                        failed += 1
                    from gpadjoint._io import atomic_write

                    text = json.dumps(rec, indent=1, default=float)
                    atomic_write(path, lambda fh, t=text: fh.write(t), binary=False)
                    if rec["status"] == "ok":  # finished: nothing left to resume
                        ckpt.unlink(missing_ok=True)
                        bu.segments_path(ckpt).unlink(missing_ok=True)
                        bu.evaluations_path(ckpt).unlink(missing_ok=True)
                        bu.sessions_path(ckpt).unlink(missing_ok=True)
                        # the subset start's own checkpoint (gpadjoint.start)
                        start_path(ckpt).unlink(missing_ok=True)
                    print(
                        f"  -> {rec['status']}: rmse {rec.get('test_rmse')}, "
                        f"s/epoch {rec.get('seconds_per_epoch')}, "
                        f"total s {rec.get('total_seconds')} over {rec.get('sessions')} "
                        "session(s), "
                        f"common loss {rec.get('final_train_loss_common')}",
                        flush=True,
                    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
