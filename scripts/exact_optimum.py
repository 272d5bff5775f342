"""The maximum-likelihood hyperparameters of the paper's model, by float64 Cholesky and L-BFGS.

    python scripts/exact_optimum.py DATASET SPLIT [--init FILE] [--subset 4000] [--write-best]

writes ``results/optimum/<dataset>-split<k>.json``: the minimum of -log p(y | theta) / n (per
datum, 2 pi included) for the constant mean, output scale x Matern-3/2 ARD kernel with noise >=
1e-4 (softplus + floor), inputs z-scored, targets centred but not scaled, to a gradient 2-norm
<= 1e-6 in the raw (softplus) coordinates; with the test RMSE and NLL there.

The pieces are the package's: one value and gradient is :func:`gpadjoint.exact.make_value_and_grad`
(one blocked n x n float64 array), the steps are :func:`gpadjoint.lbfgs.minimize` (two-loop
direction, weak-Wolfe search) in the trainer's coordinates (:func:`gpadjoint.coords.to_opt`)
whitened by :func:`gpadjoint.coords.hessian_metric` of the loss on the first ``--subset`` points:
a weak input's lengthscale and the noise differ in curvature by orders of magnitude, and
unwhitened L-BFGS spends its full-n evaluations learning that. An attempt that stalls or runs
``MAX_ITER`` steps restarts from the best point with a fresh metric, while that still lowers
the loss. This script is the driver: the stages, the progress file and the record.

Stages: L-BFGS on the first ``--subset`` training points, then at full n from that optimum.
``--init FILE`` (lengthscale / outputscale / noise / mean: a results/uci record's
``final_hyperparameters`` or a plain JSON in the paper's units, or a ``gpadjoint fit`` record's
``hyperparameters`` in the data's units) skips the subset stage: that point is evaluated at full
n once, and the full stage starts from the best full-n point recorded.

Every evaluation is one line of ``<dataset>-split<k>.progress.jsonl`` (stage, n, loss,
grad_norm, raw, grad, seconds). The same command again resumes from the best point recorded
(the full stage's if it began); Ctrl-C finishes the evaluation under way, records it and stops.
A converged record is never rewritten (move it away to refit). The script refuses before
starting when the n x n array does not fit in the available memory, or when n > ``--max-n``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import scipy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from gpadjoint import coords, exact, lbfgs  # noqa: E402
from gpadjoint.kernels import NOISE_FLOOR, Params, constrain, unconstrain  # noqa: E402

ROOT = bu.ROOT
OUT_DIR = ROOT / "results" / "optimum"
KERNEL = "matern32"
GRAD_TOL = 1e-6  # 2-norm of the gradient in raw coordinates
SUBSET = 4000
HESS_STEP, HESS_FLOOR = 1e-5, 1e-6  # the metric's difference step (to_opt coordinates), floor
MAX_ITER = 100  # L-BFGS steps per attempt: a longer walk gets a fresh metric
MAX_STEP = 5.0  # the most a log scale or the mean moves per step (1/l: coords.INV_LS_STEP)
OVERHEAD_GIB = 2.0  # the process and the builder's (block, n) pieces beside the n x n array
MAX_N = None  # largest n to run (None: any n whose array fits)
BLAS_THREADS = 1  # OpenBLAS threads: one on a shared machine (--blas-threads on an idle one)
make_value_and_grad = exact.make_value_and_grad
now = lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")  # noqa: E731


def hypers_of(theta, noise_floor: float = NOISE_FLOOR) -> dict:
    """Return the constrained hyperparameters of a raw vector (:func:`gpadjoint.exact.flatten`)."""
    p = exact.unflatten(theta)
    h = constrain(p, noise_floor)
    return {"lengthscale": [float(v) for v in np.asarray(h.lengthscale)],
            "outputscale": float(h.outputscale), "noise": float(h.noise), "mean": float(p.mean)}


def read_progress(path: Path) -> list[dict]:
    """Return a progress file's lines; a torn last line (killed mid-write) is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(path: Path, rec: dict) -> None:
    """Append one line, after ending a torn last line (so that the new one stays whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as fh:
        torn = fh.tell() > 0 and fh.seek(-1, os.SEEK_END) >= 0 and fh.read(1) != b"\n"
        fh.write((("\n" if torn else "") + json.dumps(rec) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def evaluations(records: list[dict], stage: str) -> list[dict]:
    return [r for r in records if r.get("stage") == stage and "event" not in r and "raw" in r
            and "loss" in r and math.isfinite(r["loss"])]


def best_record(records: list[dict], stage: str) -> dict | None:
    return min(evaluations(records, stage), key=lambda r: r["loss"], default=None)


class _Interrupt:
    """SIGINT sets a flag (a second one stops at once); :class:`Book` stops after recording."""

    flag = False

    def __enter__(self):
        def handler(signum, frame):
            if self.flag:
                raise KeyboardInterrupt
            self.flag = True
            print("\nSIGINT: finishing this evaluation, then stopping (again to stop now)",
                  file=sys.stderr, flush=True)

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Book:
    """``fg`` that appends each evaluation to the progress file and keeps the best one."""

    def __init__(self, fg, progress: Path, stage: str, n: int, *, interrupt=None, timings=None,
                 log=None):
        self.fg, self.progress, self.stage, self.n = fg, progress, stage, n
        self.interrupt, self.timings, self.log = interrupt, timings, log
        self.best, self.seen, self.count = None, {}, 0

    def remember(self, rec: dict) -> None:
        """Take a recorded evaluation as seen (and as the best if it is)."""
        self.seen[np.asarray(rec["raw"], np.float64).tobytes()] = rec
        if self.best is None or rec["loss"] < self.best["loss"]:
            self.best = rec

    def __call__(self, raw, **extra):
        """Evaluate at ``raw``, append the line (``extra`` keys added), return (loss, grad)."""
        raw = np.asarray(raw, np.float64)
        t0 = time.perf_counter()
        try:
            f, g = self.fg(raw)
        except np.linalg.LinAlgError:  # a step far outside the model's range
            f, g = math.nan, np.full(raw.size, math.nan)
        dt = time.perf_counter() - t0
        rec = {"stage": self.stage, "n": self.n, "eval": self.count + 1, **extra,
               "loss": float(f), "grad_norm": float(np.linalg.norm(g)), "seconds": round(dt, 4),
               "raw": raw.tolist(), "grad": np.asarray(g).tolist(), "time": now()}
        if self.timings:
            rec["parts"] = {k: round(v, 3) for k, v in self.timings.items()}
        if math.isfinite(rec["loss"]) and np.all(np.isfinite(g)):
            self.count += 1
            self.remember(rec)
        else:  # not an evaluation the readers should see: no "stage" key
            rec = {"event": "non-finite", "at_stage": rec.pop("stage")} | rec
        append_record(self.progress, rec)
        if self.log:
            self.log(f"  [{self.stage} n={self.n}] eval {self.count:4d}  loss {f:.12f}  |g| "
                     f"{rec['grad_norm']:.3e}  {dt:6.2f} s  peak "
                     f"{bu.peak_rss_mib() / 1024:.2f} GiB", flush=True)
        if self.interrupt is not None and self.interrupt.flag:
            raise KeyboardInterrupt
        return f, g


def _to_raw(u, like: Params) -> np.ndarray:
    return exact.flatten(coords.from_opt(coords.unflat(u, like)))


def _grad_u(g, raw) -> np.ndarray:
    return coords.flat(coords.opt_grad(exact.unflatten(g), exact.unflatten(raw)))


def _metric(hess: Book, x, u_c, like, log) -> tuple[np.ndarray, dict]:
    """M whitening the subset loss's Hessian at ``x`` in to_opt coordinates (p + 1 gradients)."""
    t0 = time.perf_counter()

    def grad(u):  # the centre exactly, without a round trip through the coordinates
        raw = x if np.array_equal(u, u_c) else _to_raw(u, like)
        return _grad_u(hess(raw)[1], raw)

    M, lam = coords.hessian_metric(grad, u_c, step=HESS_STEP, floor=HESS_FLOOR)
    if not np.all(np.isfinite(M)):
        raise SystemExit(f"the subset loss's Hessian at {x.tolist()} is not finite")
    info = {"eigenvalues": lam.tolist(), "floor": HESS_FLOOR * float(np.max(np.abs(lam))),
            "negative": int(np.sum(lam < 0)), "step": HESS_STEP,
            "seconds": round(time.perf_counter() - t0, 2)}
    log(f"  [{hess.stage}] metric: Hessian eigenvalues {lam.min():.2e} .. {lam.max():.2e} "
        f"({info['seconds']} s)", flush=True)
    return M, info


def _attempt(book: Book, hess: Book | None, x, gtol: float, log):
    """One L-BFGS run from ``x`` in coordinates v with to_opt(raw) = u_c + M v.

    Returns the :class:`gpadjoint.lbfgs.Result`, the attempt's summary and the progress
    record of the point it ended at.
    """
    like = exact.unflatten(x)
    u_c = coords.flat(coords.to_opt(like))
    M, info = _metric(hess, x, u_c, like, log) if hess else (np.eye(x.size), None)

    def raw_of(v):
        return x if not np.any(v) else _to_raw(u_c + M @ v, like)

    def fun(v):
        raw, u = raw_of(v), u_c + M @ v
        f, g = book(raw)
        gu = _grad_u(g, raw)
        gu[:-3] *= np.sign(u[:-3])  # from_opt reads 1/l as |u|: the loss is even in it
        return f, M.T @ gu

    def done(v, f, gv):  # the test is on the raw gradient, as every record states
        rec = book.seen.get(raw_of(v).tobytes())
        return rec is not None and rec["grad_norm"] <= gtol

    start = book.seen.get(x.tobytes())
    f0, g0 = (start["loss"], M.T @ _grad_u(start["grad"], x)) if start else (None, None)
    caps = Params(coords.INV_LS_STEP, MAX_STEP, MAX_STEP, MAX_STEP)
    res = lbfgs.minimize(fun, np.zeros(x.size), value0=f0, grad0=g0, done=done,
                         max_iter=MAX_ITER, max_step=lambda v, d: lbfgs.step_cap(
                             coords.unflat(M @ d, like), caps))
    return res, {"message": res.message, "iterations": res.iterations,
                 "evaluations": res.evaluations, "preconditioned": hess is not None,
                 "hessian": info}, book.seen[raw_of(res.x).tobytes()]


def optimise(fg, x0, *, progress: Path, stage: str, n: int, gtol: float = GRAD_TOL,
             hess_fg=None, hess_n: int | None = None, restarts: int = 6, start=None,
             interrupt=None, timings=None, log=print) -> dict:
    """L-BFGS from ``x0`` until |grad|_2 <= gtol (raw), recording every evaluation.

    ``hess_fg``: the loss on a subset, whose Hessian whitens each attempt's coordinates.
    ``start``: the progress record of ``x0`` (with its gradient) when evaluated before.
    """
    book = Book(fg, progress, stage, n, interrupt=interrupt, timings=timings, log=log)
    hess = hess_fg and Book(hess_fg, progress, f"{stage}:hessian", hess_n, interrupt=interrupt)
    if start is not None and "grad" in start:
        book.remember(start)
    x, attempts, converged = np.asarray(x0, np.float64), [], False
    for attempt in range(restarts + 1):
        before = book.best["loss"] if book.best else math.inf
        res, info, end = _attempt(book, hess, x, gtol, log)
        if res.converged and end["loss"] <= book.best["loss"] + 1e-12:
            book.best, converged = end, True  # a stationary point no worse than any (round-off)
        attempts.append(info | {"best_loss": book.best["loss"],
                                "best_grad_norm": book.best["grad_norm"]})
        x = np.asarray(book.best["raw"], np.float64)
        if converged or (attempt and not book.best["loss"] < before):
            break
        log(f"  [{stage}] L-BFGS stopped at |g| = {book.best['grad_norm']:.3e} > {gtol:g} "
            f"({res.message}); restarting from the best point", flush=True)
    return _result(book.best, gtol, converged, attempts[-1]["message"], attempts)


def _result(best: dict, gtol: float, converged: bool, why: str, attempts: list) -> dict:
    return {"theta": np.asarray(best["raw"]), "loss": best["loss"],
            "grad_norm": best["grad_norm"], "converged": converged, "attempts": attempts,
            "message": (f"converged: |grad|_2 = {best['grad_norm']:.3e} <= {gtol:g}"
                        if converged else f"NOT converged: |grad|_2 = {best['grad_norm']:.3e} "
                        f"> {gtol:g} at the best point; {why}")}


def record_best(records: list[dict], gtol: float) -> dict:
    """:func:`optimise`'s result at the best full-n point recorded, with no new evaluation."""
    best = best_record(records, "full")
    return _result(best, gtol, best["grad_norm"] <= gtol,
                   "written by --write-best (rerun without it to continue)", [])


def memory_check(n: int, max_n: int | None = MAX_N) -> tuple[bool, str]:
    """Whether the one n x n float64 array fits (:func:`gpadjoint.exact.factor_fits`)."""
    ok, msg = exact.factor_fits(n)
    if ok and max_n is not None and n > max_n:
        return False, f"{msg}, but n = {n} > --max-n = {max_n}"
    return ok, msg


def init_theta(d: int, init_file: str | None, noise_floor: float,
               split=None) -> tuple[np.ndarray, str]:
    """Return the raw start: 0 (mean 0), or ``--init``'s hyperparameters in the split's units.

    A results/uci record's ``final_hyperparameters`` and a plain JSON are in the paper's
    units already; a ``gpadjoint fit`` record's ``hyperparameters`` are in the data's, and
    go through the one conversion (:func:`gpadjoint.data.hyperparameters_in_split_units`).
    """
    if init_file is None:
        return np.zeros(d + 3), ("raw parameters 0 (lengthscales, output scale 0.693, noise "
                                 "0.693 + floor), mean 0")
    rec = json.loads(Path(init_file).read_text())
    h = rec.get("final_hyperparameters")
    if h is None and "hyperparameters" in rec:
        if split is None:
            raise SystemExit(f"--init {init_file}: hyperparameters in the data's units need "
                             "the split to convert them")
        h = bu.split_units(rec["hyperparameters"] | {"mean": rec["hyperparameters"].get(
            "mean", float(split.y_mean))}, split)
    h = rec if h is None else h
    ls = np.asarray(h["lengthscale"], np.float64).reshape(-1)
    ls = np.full(d, float(ls[0])) if ls.size == 1 else ls
    if ls.size != d:
        raise SystemExit(f"--init {init_file}: {ls.size} lengthscales, the data have d = {d}")
    p = unconstrain(ls, h["outputscale"], h["noise"], h.get("mean", 0.0),
                    noise_floor=noise_floor, dtype=np.float64)
    return exact.flatten(p), f"--init {init_file}"


def _fit(o, X, y, progress: Path, records: list[dict]):
    """Run the stages: the --init point, the subset stage (unless the full one began), full n."""
    n, d = X.shape
    hess_n = o.subset or min(n, SUBSET)
    t_sub, t_full = {}, {}
    hess_fg = make_value_and_grad(X[:hess_n], y[:hess_n], kernel=KERNEL,
                                  noise_floor=o.noise_floor, timings=t_sub)
    fg = make_value_and_grad(X, y, kernel=KERNEL, noise_floor=o.noise_floor, timings=t_full)
    common = dict(progress=progress, gtol=o.gtol, hess_fg=hess_fg, hess_n=hess_n,
                  restarts=o.restarts, interrupt=o.interrupt, log=o.log)
    theta0, o.origin = init_theta(d, o.init, o.noise_floor, o.split_data)
    if o.init is not None and not any(np.array_equal(r["raw"], theta0)
                                      for r in evaluations(records, "full")):
        Book(fg, progress, "full", n, timings=t_full, log=o.log, interrupt=o.interrupt)(
            theta0, eval=0, origin=o.origin)  # once: a rerun finds it recorded
        records = read_progress(progress)
    best_full = best_record(records, "full")
    if o.write_best and best_full is None:
        raise SystemExit("--write-best: no full-n evaluation is recorded yet; run without it")
    if best_full is not None:
        x, why = best_full["raw"], ("resumed from the best full-n point recorded (loss "
                                    f"{best_full['loss']:.12f})")
    elif o.subset:
        if not [r for r in records if r.get("event") == "stage_end"
                and r.get("stage") == "subset"]:
            b = best_record(records, "subset")
            o.sub_origin = (f"resumed from the best subset point recorded (loss {b['loss']:.12f})"
                            if b else o.origin)
            o.log(f"stage subset: first {o.subset} of {n} training points, from {o.sub_origin}")
            res = optimise(hess_fg, b["raw"] if b else theta0, stage="subset", n=o.subset,
                           start=b, timings=t_sub, **common)
            append_record(progress, {"event": "stage_end", "stage": "subset", "loss": res["loss"],
                                     "grad_norm": res["grad_norm"], "message": res["message"]})
            records = read_progress(progress)
        x, why = best_record(records, "subset")["raw"], (
            f"the subset stage's optimum (first {o.subset} points)")
    else:
        x, why = theta0, o.origin
    o.log(f"stage full: n = {n}, from {why}")
    res = record_best(records, o.gtol) if o.write_best else optimise(
        fg, x, stage="full", n=n, start=best_full, timings=t_full, **common)
    append_record(progress, {"event": "stage_end", "stage": "full", "loss": res["loss"],
                             "grad_norm": res["grad_norm"], "message": res["message"]})
    return res, why


def _stage_summary(records: list[dict], stage: str, n: int, noise_floor: float) -> dict | None:
    ev = evaluations(records, stage)
    if not ev:
        return None
    secs, b = np.asarray([r["seconds"] for r in ev]), best_record(records, stage)
    ends = [r for r in records if r.get("event") == "stage_end" and r.get("stage") == stage]
    parts = [r["parts"] for r in ev if "parts" in r]
    return {"n": n, "evaluations": len(ev), "evaluation_seconds_total": float(secs.sum()),
            "seconds_per_evaluation_median": float(np.median(secs)),
            "seconds_per_evaluation_min": float(secs.min()),
            "parts_seconds_median": {k: float(np.median([p[k] for p in parts]))
                                     for k in ("build", "potrf", "potri", "pullback") if parts},
            "loss": b["loss"], "grad_norm": b["grad_norm"],
            "message": ends[-1]["message"] if ends else None,
            "hyperparameters": hypers_of(b["raw"], noise_floor)}


def run(dataset: str, split: int, *, out_dir: Path = OUT_DIR, init: str | None = None,
        subset: int = SUBSET, gtol: float = GRAD_TOL, noise_floor: float = NOISE_FLOOR,
        restarts: int = 6, blas_threads: int | None = BLAS_THREADS, max_n: int | None = MAX_N,
        data=None, argv=None, write_best: bool = False, log=print) -> dict:
    """Fit one split; write and return the record (an existing converged one is returned).

    ``write_best``: no evaluation; the record at the best full-n point recorded (marked not
    converged unless its gradient passes). ``data``: a Split, instead of loading one.
    """
    from threadpoolctl import threadpool_limits

    from gpadjoint._io import atomic_write

    out_path = Path(out_dir) / f"{dataset}-split{split}.json"
    if out_path.exists() and (kept := json.loads(out_path.read_text())).get("converged"):
        log(f"{out_path} holds a converged optimum; kept (move it away to refit)")
        return kept
    o = argparse.Namespace(dataset=dataset, split=split, init=init, gtol=gtol, log=log,
                           noise_floor=noise_floor, restarts=restarts, write_best=write_best,
                           argv=argv, blas_threads=blas_threads, started=now(), sub_origin=None,
                           load_before=bu.load_avg(), t0=time.perf_counter())
    sp = o.split_data = data if data is not None else bu.load_split(dataset, split)
    n, d = sp.X_train.shape
    ok, o.memory = memory_check(n, max_n)
    if not ok:
        raise SystemExit(f"refusing {dataset} split {split}: {o.memory}.")
    log(o.memory)
    o.subset = min(subset, n) if subset and subset < n else 0
    progress = out_path.with_name(f"{dataset}-split{split}.progress.jsonl")
    records = read_progress(progress)
    for r in records:
        if r.get("event") == "start" and (r["n"], r["d"], r.get("noise_floor")) != (
                n, d, noise_floor):
            raise SystemExit(f"{progress} was written for another problem ({r}); move it away")
    append_record(progress, {"event": "start", "dataset": dataset, "split": split, "n": n,
                             "d": d, "subset": o.subset, "kernel": KERNEL,
                             "noise_floor": noise_floor, "command": argv,
                             "commit": bu.git_commit(), "started": o.started})
    X, y = np.asarray(sp.X_train, np.float64), np.asarray(sp.y_train, np.float64)
    with threadpool_limits(limits=blas_threads, user_api="blas"), _Interrupt() as o.interrupt:
        res, full_origin = _fit(o, X, y, progress, records)
        o.peak = bu.peak_rss_mib() / 1024
        log("test predictions at the optimum ...", flush=True)
        rec = _record(o, sp, res, read_progress(progress), progress, full_origin)
    text = json.dumps(rec, indent=1)
    atomic_write(out_path, lambda fh: fh.write(text), binary=False)
    log(f"wrote {out_path}: loss {res['loss']:.12f}, |g| {res['grad_norm']:.3e}, RMSE "
        f"{rec['test_rmse']:.6f}, NLL {rec['test_nll']:.6f}; {res['message']}")
    return rec


def _record(o, sp, res: dict, records: list[dict], progress: Path, full_origin: str) -> dict:
    from gpadjoint.evaluate import exact_point

    n, d = sp.X_train.shape
    h = hypers_of(res["theta"], o.noise_floor)
    pred = exact_point(sp.X_train, sp.y_train, sp.X_test, kernel=KERNEL, **h)
    rmse, nll = bu.predictive_scores(sp.unscale_y(sp.y_test), sp.unscale_y(pred["mean"]),
                                     sp.unscale_y_var(pred["var"]))
    stages = {"full": _stage_summary(records, "full", n, o.noise_floor) | {
        "origin": full_origin, "attempts_this_session": res["attempts"]}}
    if o.subset and (sub := _stage_summary(records, "subset", o.subset, o.noise_floor)):
        stages = {"subset": sub | ({"origin": o.sub_origin} if o.sub_origin else {})} | stages
    ev = evaluations(records, "subset") + evaluations(records, "full")
    return {
        "dataset": o.dataset, "split": o.split, "n": n, "d": d, "n_test": int(sp.n_test),
        "model": {"kernel": KERNEL, "mean": "constant", "outputscale": True, "ard": True,
                  "noise_floor": o.noise_floor, "constraint": "softplus (+ floor for the noise)",
                  "inputs": "z-scored (training statistics)",
                  "targets": "centred on the training mean, not scaled (normalize_y=False)"},
        "loss_definition": "-log p(y | theta) / n, 2 pi included (gpadjoint.exact)",
        "loss": res["loss"], "grad_norm": res["grad_norm"], "grad_tol": o.gtol,
        "converged": res["converged"], "message": res["message"],
        "optimizer": "gpadjoint.lbfgs.minimize in coords.to_opt coordinates whitened by the "
                     "subset loss's coords.hessian_metric",
        "raw": [float(v) for v in res["theta"]],
        "raw_layout": f"raw_lengthscale[{d}], raw_outputscale, raw_noise, mean",
        "hyperparameters": h, "test_rmse": rmse, "test_nll": nll,
        "min_predictive_variance": float(np.min(pred["var"])),
        "test_metrics_units": "target units (posterior by float64 Cholesky; noise in the "
                              "predictive variance)",
        "evaluations": len(ev), "evaluation_seconds_total": float(sum(r["seconds"] for r in ev)),
        "stages": stages, "peak_rss_gib": round(o.peak, 3),
        "nxn_array_gib": round(8.0 * n * n / 2**30, 3), "memory": o.memory, "init": o.origin,
        "command": o.argv, "commit": bu.git_commit(), "machine": bu.machine(),
        "host": socket.gethostname(), "versions": bu.versions() | {"scipy": scipy.__version__},
        "started": o.started,
        # every session that worked on this progress file (a resumed run has several)
        "sessions": [{k: r.get(k) for k in ("started", "commit", "command")}
                     for r in records if r.get("event") == "start"],
        "finished": now(), "wall_seconds_this_session": round(time.perf_counter() - o.t0, 1),
        "load_avg_before": o.load_before, "load_avg_after": bu.load_avg(),
        "progress_file": _relative(progress), "blas_threads": o.blas_threads,
        "script": "scripts/exact_optimum.py",
    }


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("split", type=int)
    ap.add_argument("--init", help="JSON with lengthscale, outputscale, noise, mean to start "
                                   "from (or a record with final_hyperparameters)")
    ap.add_argument("--subset", type=int, default=SUBSET,
                    help="warm-start stage on the first N training points (0: none)")
    ap.add_argument("--gtol", type=float, default=GRAD_TOL)
    ap.add_argument("--restarts", type=int, default=6)
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--max-n", type=int, default=MAX_N,
                    help="refuse larger n (default: any n whose array fits)")
    ap.add_argument("--blas-threads", type=int, default=BLAS_THREADS,
                    help="OpenBLAS threads for the factorisation and inverse")
    ap.add_argument("--write-best", action="store_true",
                    help="write the record at the best full-n point recorded so far, without "
                         "evaluating more (marked not converged); rerun without it to continue")
    args = ap.parse_args(argv)
    cmd = "python scripts/exact_optimum.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        rec = run(args.dataset, args.split, out_dir=Path(args.out_dir), init=args.init,
                  subset=args.subset, gtol=args.gtol, restarts=args.restarts,
                  blas_threads=args.blas_threads, max_n=args.max_n, argv=cmd,
                  write_best=args.write_best)
    except KeyboardInterrupt:
        print("interrupted; every evaluation so far is in the progress file; run the same "
              "command again to resume from the best point", file=sys.stderr)
        return 130
    return 0 if rec["converged"] else 2


if __name__ == "__main__":
    sys.exit(main())
