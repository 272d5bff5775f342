"""The maximum-likelihood hyperparameters of the paper's model, by float64 Cholesky and L-BFGS.

    python scripts/exact_optimum.py DATASET SPLIT [--init FILE] [--subset 4000]

writes ``results/optimum/<dataset>-split<k>.json``: the optimum of -log p(y | theta) / n (per
datum, 2 pi included; :func:`gpadjoint.mll.neg_mll_exact`) for the constant mean, output scale x
Matern-3/2 ARD kernel with noise >= 1e-4 (softplus + floor), inputs z-scored and targets centred
but not scaled, to a gradient 2-norm <= 1e-6 in the raw (unconstrained) coordinates; with the
test RMSE and NLL (predictive, noise included, target units) at that optimum.

One value + gradient (:func:`make_value_and_grad`) is :func:`gpadjoint.exact.make_value_and_grad`:
K built by row blocks into one n x n float64 array, factorised and inverted in place by blocks,
and Kbar = (K^-1 - alpha alpha^T) / (2n) pulled back through the same row-block builder (one
pass over half the pairs gives every kernel parameter's gradient); -sum(alpha) / n is the
mean's. This script is the driver: the optimiser, the progress file and the record.

Optimiser: scipy's L-BFGS-B on the flattened raw parameters, stopped by this script's own test
|grad|_2 <= 1e-6 (raw coordinates) at every evaluation. The lengthscales of weak inputs drift to
hundreds (curvature ~ 1/l^4) while the noise has curvature O(1); raw-coordinate L-BFGS took 372
evaluations on elevators' 4000-point subset and was still at |g| ~ 5e-5, so restarts (and the
whole full-n stage) run in coordinates whitened by a forward-difference Hessian of the subset
loss (p + 1 subset gradients, cheap next to one full-n evaluation): 44 more evaluations reached
6e-7 there. Those whitened attempts step in the trainer's coordinates (:func:`to_u`: 1/lengthscale,
log scales, the mean): in raw coordinates the full elevators run crawled along the weak inputs'
lengthscales (41 evaluations, still at |g| ~ 2e-3).

Warm start: the same L-BFGS first runs to convergence on the first ``--subset`` training points
(default 4000), and the full-n run starts from that optimum. ``--init FILE`` (a JSON with
lengthscale / outputscale / noise / mean, e.g. another fit's ``final_hyperparameters``) skips
the subset stage: that point is evaluated at full n (once; recorded) and the full stage starts
from the best full-n point recorded.

Every evaluation is appended to ``<dataset>-split<k>.progress.jsonl`` (raw parameters, loss,
gradient, its norm, seconds). Run the same command again after an interruption and it restarts
from the best point recorded (the full-n stage's if it began, else the subset stage's); Ctrl-C
finishes the evaluation under way, records it, then stops.

Memory: one n x n float64 array (K, its factor and K^-1 in turn, in place; the builder and its
VJP go by row blocks) plus ~2 GiB. The script refuses before starting when that does not fit in
the available memory, or when n > ``--max-n`` (no cap unless given).
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

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from gpadjoint import exact  # noqa: E402
from gpadjoint.kernels import (  # noqa: E402
    NOISE_FLOOR,
    Params,
    constrain,
    unconstrain,
)
from gpadjoint.train import from_opt, opt_grad, to_opt  # noqa: E402

ROOT = bu.ROOT
OUT_DIR = ROOT / "results" / "optimum"
KERNEL = "matern32"
GRAD_TOL = 1e-6  # 2-norm of the gradient in raw coordinates
SUBSET = 4000
HESS_STEP = 1e-5  # forward-difference step of the preconditioner's Hessian, to_u coordinates
BLOCK = 1024  # rows per block of the K builder and its VJP
# Memory: the one n x n float64 array (K, its factor, K^-1, all in place) plus the process
# (JAX, compiled code) and a few (BLOCK, n) arrays of the builder and its VJP; OVERHEAD_GIB
# covers the last two (measured: see the record's peak_rss_gib against nxn_array_gib).
OVERHEAD_GIB = 2.0
# Largest n to run (None: any n whose array fits); every step is blocked (gpadjoint.exact), so no
# LAPACK call sees the whole matrix.
MAX_N = None
# OpenBLAS threads for the factorisation and inverse: one by default, since on a shared machine
# threads that wait for each other while another job holds a core were slower than one thread;
# --blas-threads 2 or more on an idle machine.
BLAS_THREADS = 1


# --------------------------------------------------------------------------------------------
# value and gradient


flatten = exact.flatten  # [raw_lengthscale (d), raw_outputscale, raw_noise, mean]


def unflatten(theta) -> Params:
    """Inverse of :func:`flatten` (float64 JAX arrays)."""
    return Params(*(jnp.asarray(v) for v in exact.unflatten(theta)))


def hypers_of(theta, noise_floor: float = NOISE_FLOOR) -> dict:
    """Return the constrained hyperparameters of a raw vector, as plain floats."""
    p = unflatten(theta)
    h = constrain(p, noise_floor)
    return {"lengthscale": [float(v) for v in np.asarray(h.lengthscale)],
            "outputscale": float(h.outputscale), "noise": float(h.noise),
            "mean": float(p.mean)}


def _params_np(vec) -> Params:
    t = np.asarray(vec, np.float64)
    return Params(t[:-3], t[-3], t[-2], t[-1])


def to_u(theta) -> np.ndarray:
    """Raw vector -> the trainer's L-BFGS coordinates (:func:`gpadjoint.train.to_opt`).

    1/lengthscale, log output scale, log(noise - floor), mean: a weak input's lengthscale
    drifting from 100 to 800 is a move from 0.01 to 0.0013 here, and the loss is smooth and
    even in 1/l at 0, where in raw coordinates it is a walk to infinity along a slope that
    vanishes like 1/l^2 (elevators split 0 in raw coordinates: 41 full-n evaluations, still
    descending at |g| ~ 2e-3).
    """
    return flatten(to_opt(_params_np(theta)))


def from_u(u) -> np.ndarray:
    """Inverse of :func:`to_u`."""
    return flatten(from_opt(_params_np(u)))


def grad_u(g, theta) -> np.ndarray:
    """Return the gradient in :func:`to_u` coordinates from the raw gradient ``g`` at ``theta``."""
    return flatten(opt_grad(_params_np(g), _params_np(theta)))


def make_value_and_grad(X, y, *, kernel: str = KERNEL, noise_floor: float = NOISE_FLOOR,
                        block: int = BLOCK, timings: dict | None = None):
    """Return ``f(theta) -> (loss, grad)`` for flattened raw parameters (see :func:`flatten`).

    :func:`gpadjoint.exact.make_value_and_grad`: one n x n float64 array, K built by row blocks,
    factorised and inverted in place by blocks, Kbar pulled back through the same builder.
    ``timings``, if given, receives the seconds of each part (build, potrf, potri, pullback).
    """
    return exact.make_value_and_grad(X, y, kernel=kernel, noise_floor=noise_floor, block=block,
                                     timings=timings)


def predict(theta, X, y, X_test, *, kernel: str = KERNEL, noise_floor: float = NOISE_FLOOR,
            block: int = BLOCK):
    """Posterior predictive mean and variance (noise included) at X_test, by one Cholesky."""
    h = hypers_of(np.asarray(theta, np.float64), noise_floor)
    f = exact.factor(X, y, exact.as_hypers(h["lengthscale"], h["outputscale"], h["noise"]),
                     h["mean"], kernel=kernel, block=block)
    return exact.posterior(f, X_test)


def score_test(theta, split, **kw) -> dict:
    """Test RMSE and mean NLL in target units."""
    mu, var = predict(theta, split.X_train, split.y_train, split.X_test, **kw)
    mu_u = split.unscale_y(mu)
    var_u = split.unscale_y_var(var)
    y_u = split.unscale_y(split.y_test)
    err = y_u - mu_u
    return {"test_rmse": float(np.sqrt(np.mean(err**2))),
            "test_nll": float(np.mean(0.5 * np.log(2 * math.pi * var_u) + 0.5 * err**2 / var_u)),
            "min_predictive_variance": float(np.min(var))}

# --------------------------------------------------------------------------------------------
# progress file and optimiser


def read_progress(path: Path) -> list[dict]:
    """Read a progress file's records; a torn last line (killed mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_record(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(rec) + "\n"
    with open(path, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def evaluations(records: list[dict], stage: str) -> list[dict]:
    return [r for r in records
            if r.get("stage") == stage and "event" not in r and "raw" in r and "loss" in r]


def best_record(records: list[dict], stage: str) -> dict | None:
    ev = [r for r in evaluations(records, stage) if math.isfinite(r["loss"])]
    return min(ev, key=lambda r: r["loss"]) if ev else None


class _Interrupt:
    """SIGINT sets a flag; the objective stops after recording the evaluation under way."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.flag:  # a second Ctrl-C: stop now (the reader skips a torn line)
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
        return False


class _Converged(Exception):
    """Raised by the objective at the first point with |grad|_2 <= gtol."""


class _NonFinite(Exception):
    """Raised by the objective at a non-finite loss (a step far outside the model's range)."""


def hessian_preconditioner(fg, theta, *, step: float = 1e-4, floor: float = 1e-6,
                           record=None) -> tuple[np.ndarray, dict]:
    """M with theta = theta_c + M v making the Hessian at theta_c about the identity in v.

    The Hessian is the forward difference of the exact gradient (p + 1 evaluations of ``fg``,
    each passed to ``record``), symmetrised; its eigenvalues are replaced by their absolute
    values, floored at ``floor`` times the largest, and M = Q diag(lambda)^-1/2. L-BFGS in v is
    then L-BFGS with that Hessian as its initial inverse-Hessian scale: the lengthscales that
    drift to hundreds (flat directions, curvature ~ 1/l^4) and the noise (curvature O(1)) differ
    in curvature by orders of magnitude, and L-BFGS in the raw coordinates took hundreds of
    evaluations on that.
    """
    theta = np.asarray(theta, np.float64)
    p = theta.size
    f0, g0 = fg(theta)
    if record:
        record(theta, f0, g0)
    H = np.empty((p, p))
    for j in range(p):
        t = theta.copy()
        t[j] += step
        f, g = fg(t)
        if record:
            record(t, f, g)
        H[:, j] = (g - g0) / step
    H = 0.5 * (H + H.T)
    lam, Q = np.linalg.eigh(H)
    top = float(np.max(np.abs(lam)))
    lam_used = np.maximum(np.abs(lam), floor * top)
    info = {"eigenvalues": [float(v) for v in lam], "floor": floor * top,
            "negative": int(np.sum(lam < 0)), "step": step}
    return Q / np.sqrt(lam_used), info


def optimise(fg, theta0, *, progress: Path, stage: str, n: int, gtol: float = GRAD_TOL,
             restarts: int = 3, maxiter: int = 5000, hess_fg=None, hess_n: int | None = None,
             precondition_first=False, first_maxiter: int = 100,
             interrupt: _Interrupt | None = None, timings: dict | None = None,
             start: dict | None = None, log=print) -> dict:
    """L-BFGS-B on ``fg`` from ``theta0`` until |grad|_2 <= gtol, recording every evaluation.

    The test is this function's own, at every evaluation, on the 2-norm of the gradient in the
    raw coordinates (scipy's tests are switched off: gtol = ftol = 0). When L-BFGS stops
    earlier (a line search that cannot lower the loss within round-off, or ``maxiter``), it is
    restarted from the best point, up to ``restarts`` times while that still lowers the loss.
    With ``hess_fg`` (a cheaper function of the same parameters, e.g. on a subset of the
    data), restarts, and the first attempt if ``precondition_first`` (else the first attempt
    stops after ``first_maxiter`` iterations), run in coordinates whitened by its Hessian at
    the current best point (:func:`hessian_preconditioner`). The result says honestly where it
    ended. ``start``: the progress record of ``theta0`` when it was evaluated before (a resumed
    run), so that its loss and gradient are not computed again.
    """
    known = start is not None and np.array_equal(start["raw"], theta0) and "grad" in start
    state = {"best": start if known else None, "count": 0, "seconds": 0.0}

    def obj(theta):
        t0 = time.perf_counter()
        f, g = fg(theta)
        dt = time.perf_counter() - t0
        gn = float(np.linalg.norm(g))
        state["count"] += 1
        state["seconds"] += dt
        rec = {"stage": stage, "n": n, "eval": state["count"], "loss": float(f),
               "grad_norm": gn, "seconds": round(dt, 4),
               "raw": [float(v) for v in theta], "grad": [float(v) for v in g],
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if timings:  # seconds of the parts of this evaluation (make_value_and_grad)
            rec["parts"] = {k: round(v, 3) for k, v in timings.items()}
        append_record(progress, rec)
        best = state["best"]
        if best is None or f < best["loss"]:
            state["best"] = rec
        log(f"  [{stage} n={n}] eval {state['count']:4d}  loss {f:.12f}  |g| {gn:.3e}  "
            f"{dt:6.2f} s  peak {bu.peak_rss_mib() / 1024:.2f} GiB", flush=True)
        if interrupt is not None and interrupt.flag:
            raise KeyboardInterrupt
        if not math.isfinite(f):
            raise _NonFinite
        if gn <= gtol and (best is None or f <= best["loss"] + 1e-12):
            state["best"] = rec  # a stationary point no worse than any seen (round-off)
            raise _Converged
        return f, g

    def record_hessian_eval(theta, f, g):
        append_record(progress, {"stage": f"{stage}:hessian", "n": hess_n, "loss": float(f),
                                 "grad_norm": float(np.linalg.norm(g)),
                                 "raw": [float(v) for v in theta],
                                 "grad": [float(v) for v in g]})
        if interrupt is not None and interrupt.flag:
            raise KeyboardInterrupt

    attempts = []
    x = np.asarray(theta0, np.float64)
    converged = False
    damp = 1.0  # shrinks the first step tenfold after each non-finite loss
    for attempt in range(restarts + 1):
        before = state["best"]["loss"] if state["best"] else math.inf
        M, hinfo = None, None
        if hess_fg is not None and (attempt or precondition_first):
            t0 = time.perf_counter()
            u_x = to_u(x)

            def hess_in_u(u, x=x, u_x=u_x):  # the subset's loss and gradient, to_u coordinates
                raw = x if np.array_equal(u, u_x) else from_u(u)  # the centre without round-off
                f, g = hess_fg(raw)
                record_hessian_eval(raw, f, g)
                return f, grad_u(g, raw)

            M, hinfo = hessian_preconditioner(hess_in_u, u_x, step=HESS_STEP)
            hinfo["seconds"] = round(time.perf_counter() - t0, 2)
            log(f"  [{stage}] preconditioner: Hessian eigenvalues "
                f"{min(hinfo['eigenvalues']):.2e} .. {max(hinfo['eigenvalues']):.2e} "
                f"({hinfo['seconds']} s)", flush=True)
        limit = first_maxiter if (hess_fg is not None and M is None) else maxiter
        x_c = x.copy()

        msg, status, nit = "", -1, 0
        count0 = state["count"]
        try:
            if M is None:
                fun, v0 = obj, x_c
            else:
                best = state["best"]
                if best is not None and np.array_equal(best["raw"], x_c):
                    f_c, g_c = best["loss"], np.asarray(best["grad"])
                else:
                    f_c, g_c = obj(x_c)
                # whitened coordinates v: u = u_c + M v in to_u coordinates
                u_c, gu_c = to_u(x_c), grad_u(g_c, x_c)
                # scipy's first step has unit length; scaling v by |M^T g| makes it the Newton
                # step -M M^T g of the model Hessian (L-BFGS rescales itself after that)
                M = M * (damp * float(np.linalg.norm(M.T @ gu_c)))

                def fun(v, M=M, u_c=u_c, f_c=f_c, gu_c=gu_c):
                    if not np.any(v):  # the centre, evaluated just above
                        return f_c, M.T @ gu_c
                    raw = from_u(u_c + M @ v)
                    f, g = obj(raw)
                    return f, M.T @ grad_u(g, raw)
                v0 = np.zeros(x.size)
            res = minimize(fun, v0, jac=True, method="L-BFGS-B",
                           options={"gtol": 0.0, "ftol": 0.0, "maxiter": limit,
                                    "maxfun": 10 * limit, "maxcor": 20, "maxls": 40})
            msg, status, nit = str(res.message), int(res.status), int(res.nit)
        except _Converged:
            converged = True
            msg, status = f"|grad|_2 <= {gtol:g} (this script's test)", 0
        except _NonFinite:
            damp *= 0.1
            msg = f"non-finite loss at a trial point; restarting with the first step x{damp:g}"
        nfev = state["count"] - count0
        best = state["best"]
        attempts.append({"message": msg, "status": status, "iterations": nit,
                         "evaluations": nfev, "preconditioned": M is not None,
                         "hessian": hinfo, "best_loss": best["loss"],
                         "best_grad_norm": best["grad_norm"]})
        x = np.asarray(best["raw"])
        if converged:
            break
        if attempt and not best["loss"] < before and "non-finite" not in msg:
            break  # a restart that lowered nothing: round-off is all that is left
        log(f"  [{stage}] L-BFGS stopped at |g| = {best['grad_norm']:.3e} > {gtol:g} "
            f"({msg}); restarting from the best point", flush=True)
    best = state["best"]
    return {
        "theta": np.asarray(best["raw"]), "loss": best["loss"], "grad_norm": best["grad_norm"],
        "converged": converged,
        "message": (f"converged: |grad|_2 = {best['grad_norm']:.3e} <= {gtol:g}" if converged
                    else f"NOT converged: |grad|_2 = {best['grad_norm']:.3e} > {gtol:g} at the "
                         f"best point; L-BFGS-B: {attempts[-1]['message']}"),
        "attempts": attempts, "evaluations": state["count"], "seconds": state["seconds"],
    }


def record_best(records: list[dict], gtol: float) -> dict:
    """:func:`optimise`'s result for the best full-n point recorded, with no new evaluation."""
    best = best_record(records, "full")
    ok = best["grad_norm"] <= gtol
    return {"theta": np.asarray(best["raw"]), "loss": best["loss"],
            "grad_norm": best["grad_norm"], "converged": ok,
            "message": (f"converged: |grad|_2 = {best['grad_norm']:.3e} <= {gtol:g}" if ok else
                        f"NOT converged: |grad|_2 = {best['grad_norm']:.3e} > {gtol:g} at the "
                        "best point; written by --write-best (rerun without it to continue)"),
            "attempts": [], "evaluations": 0, "seconds": 0.0}


# --------------------------------------------------------------------------------------------
# driver


def memory_check(n: int, max_n: int = MAX_N) -> tuple[bool, str]:
    """Whether one n x n float64 array (+ OVERHEAD_GIB) fits in the available memory."""
    from gpadjoint.matvec import available_memory_bytes

    need = 8.0 * n * n + OVERHEAD_GIB * 2**30
    avail = available_memory_bytes()
    msg = (f"n = {n}: the n x n float64 array is {8.0 * n * n / 2**30:.1f} GiB, and with the "
           f"process and the builder's blocks this needs about {need / 2**30:.1f} GiB; "
           f"{avail / 2**30:.1f} GiB is available")
    if need > avail:
        return False, msg
    if max_n is not None and n > max_n:
        return False, f"{msg}, but n > --max-n = {max_n}"
    return True, msg


def agreement_check(X, y, noise_floor: float, n: int = 300) -> dict:
    """Compare the value and gradient with jax.value_and_grad(neg_mll_exact) at small n."""
    from gpadjoint.mll import neg_mll_exact

    X, y = np.asarray(X[:n]), np.asarray(y[:n])
    d = X.shape[1]
    rng = np.random.default_rng(0)
    theta = np.concatenate([rng.normal(0.5, 0.3, d), [0.2, -1.0, 0.05]])
    f, g = make_value_and_grad(X, y, noise_floor=noise_floor, block=128)(theta)  # 3 blocks
    ref_f, ref_g = jax.value_and_grad(
        lambda t: neg_mll_exact(unflatten_jax(t), jnp.asarray(X), jnp.asarray(y), kernel=KERNEL,
                                noise_floor=noise_floor))(jnp.asarray(theta))
    ref_g = np.asarray(ref_g)
    return {"n": n, "loss_abs_diff": abs(f - float(ref_f)),
            "grad_max_rel_diff": float(np.max(np.abs(g - ref_g)) / np.max(np.abs(ref_g)))}


def unflatten_jax(t) -> Params:
    """:func:`unflatten` for a traced JAX vector."""
    return Params(t[:-3], t[-3], t[-2], t[-1])


def init_theta(d: int, init_file: str | None, noise_floor: float) -> tuple[np.ndarray, str]:
    if init_file is None:
        # raw 0 everywhere (softplus(0) = 0.693), mean 0 (the targets are centred)
        return np.zeros(d + 3), "raw parameters 0 (lengthscales, output scale 0.693, noise " \
                                "0.693 + floor), mean 0"
    h = json.loads(Path(init_file).read_text())
    h = h.get("final_hyperparameters", h)
    ls = np.asarray(h["lengthscale"], np.float64).reshape(-1)
    if ls.size == 1:
        ls = np.full(d, float(ls[0]))
    if ls.size != d:
        raise SystemExit(f"--init {init_file}: {ls.size} lengthscales, the data have d = {d}")
    p = unconstrain(ls, h["outputscale"], h["noise"], h.get("mean", 0.0),
                    noise_floor=noise_floor, dtype=jnp.float64)
    return flatten(p), f"--init {init_file}"


def _relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run(dataset: str, split: int, *, out_dir: Path = OUT_DIR, init: str | None = None,
        subset: int = SUBSET, gtol: float = GRAD_TOL, noise_floor: float = NOISE_FLOOR,
        restarts: int = 6, blas_threads: int | None = BLAS_THREADS, max_n: int = MAX_N,
        agreement: bool = True, data=None, argv=None, write_best: bool = False,
        log=print) -> dict:
    """Fit one split; write and return the record.

    ``write_best``: no more evaluations; write the record at the best full-n point already in
    the progress file (marked not converged unless its gradient passes the test), e.g. when
    the time for the reference runs is up; rerun without it to continue.

    ``data``: a Split, to skip loading; ``agreement``: first compare the value and gradient
    with ``jax.value_and_grad(neg_mll_exact)`` on 300 points (recorded).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _run(dataset, split, out_dir=out_dir, init=init, subset=subset, gtol=gtol,
                    noise_floor=noise_floor, restarts=restarts, blas_threads=blas_threads,
                    max_n=max_n, agreement=agreement, data=data, argv=argv,
                    write_best=write_best, log=log)


def _run(dataset, split, *, out_dir, init, subset, gtol, noise_floor, restarts, blas_threads,
         max_n, agreement, data, argv, write_best, log) -> dict:
    from gpadjoint.datasets import load_dataset

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = load_avg()
    t_start = time.perf_counter()
    sp = data if data is not None else load_dataset(dataset, split, scale_y=False)
    X, y = np.asarray(sp.X_train, np.float64), np.asarray(sp.y_train, np.float64)
    n, d = X.shape
    ok, mem_msg = memory_check(n, max_n)
    if not ok:
        raise SystemExit(f"refusing {dataset} split {split}: {mem_msg}.")
    log(mem_msg)
    out_dir = Path(out_dir)
    stem = f"{dataset}-split{split}"
    progress = out_dir / f"{stem}.progress.jsonl"
    out_path = out_dir / f"{stem}.json"
    commit = bu.git_commit()
    subset = min(subset, n) if subset and subset < n else 0
    records = read_progress(progress)
    header = {"event": "start", "dataset": dataset, "split": split, "n": n, "d": d,
              "subset": subset, "kernel": KERNEL, "noise_floor": noise_floor,
              "command": argv, "commit": commit, "started": started}
    for r in records:
        if r.get("event") == "start" and (r["n"], r["d"], r.get("noise_floor")) != (
                n, d, noise_floor):
            raise SystemExit(f"{progress} was written for another problem ({r}); move it away")
    append_record(progress, header)

    agree = None
    if agreement:
        agree = agreement_check(X, y, noise_floor)
        log(f"agreement with jax.value_and_grad(neg_mll_exact) at n = {agree['n']}: |dloss| "
            f"{agree['loss_abs_diff']:.2e}, grad max rel diff {agree['grad_max_rel_diff']:.2e}")

    theta0, origin = init_theta(d, init, noise_floor)
    stages = {}
    interrupt = _Interrupt()
    # the preconditioner's Hessian is taken on the first hess_n points (cheap next to n)
    hess_n = subset if subset else min(n, SUBSET)
    t_sub, t_full = {}, {}
    hess_fg = make_value_and_grad(X[:hess_n], y[:hess_n], noise_floor=noise_floor,
                                  timings=t_sub)
    fg = make_value_and_grad(X, y, noise_floor=noise_floor, timings=t_full)
    with interrupt:
        if init is not None:
            # a start given by --init goes straight to the full stage. It is evaluated once and
            # recorded (a rerun of the same command finds it and does not evaluate it again);
            # the full stage then starts from the best full-n point recorded, this one or an
            # earlier session's
            if not any(np.array_equal(r["raw"], theta0) for r in evaluations(records, "full")):
                t0 = time.perf_counter()
                f0, g0 = fg(theta0)
                dt = time.perf_counter() - t0
                append_record(progress, {
                    "stage": "full", "n": n, "eval": 0, "origin": origin, "loss": float(f0),
                    "grad_norm": float(np.linalg.norm(g0)), "seconds": round(dt, 4),
                    "raw": [float(v) for v in theta0], "grad": [float(v) for v in g0],
                    "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
                log(f"  --init point: loss {f0:.12f}  |g| {np.linalg.norm(g0):.3e}  {dt:.1f} s")
                records = read_progress(progress)
        best_full = best_record(records, "full")
        if write_best and best_full is None:
            raise SystemExit("--write-best: no full-n evaluation is recorded yet; run without it")
        subset_ended = [r for r in records if r.get("event") == "stage_end"
                        and r.get("stage") == "subset"]
        if best_full is not None:
            x_full, full_origin = np.asarray(best_full["raw"]), (
                f"resumed from the best full-n point recorded (loss {best_full['loss']:.12f})")
        else:
            if subset and not subset_ended:
                b = best_record(records, "subset")
                x_sub, sub_origin = ((np.asarray(b["raw"]), "resumed from the best subset point "
                                      f"recorded (loss {b['loss']:.12f})") if b is not None
                                     else (theta0, origin))
                log(f"stage subset: first {subset} of {n} training points, from {sub_origin}")
                res = optimise(hess_fg, x_sub, progress=progress, stage="subset", n=subset,
                               gtol=gtol, restarts=restarts, hess_fg=hess_fg, hess_n=hess_n,
                               precondition_first=b is not None, interrupt=interrupt,
                               timings=t_sub, log=log)
                append_record(progress, {"event": "stage_end", "stage": "subset",
                                         "loss": res["loss"], "grad_norm": res["grad_norm"],
                                         "message": res["message"]})
                records = read_progress(progress)
                stages["subset"] = {"origin": sub_origin}
            if subset:
                b = best_record(records, "subset")
                x_full, full_origin = np.asarray(b["raw"]), (
                    f"the subset stage's optimum (first {subset} points)")
            else:
                x_full, full_origin = theta0, origin
        log(f"stage full: n = {n}, from {full_origin}")
        if write_best:
            res = record_best(records, gtol)
        else:
                res = optimise(fg, x_full, progress=progress, stage="full", n=n, gtol=gtol,
                           restarts=restarts, hess_fg=hess_fg, hess_n=hess_n,
                           precondition_first=True, interrupt=interrupt, timings=t_full,
                           start=best_full, log=log)
        append_record(progress, {"event": "stage_end", "stage": "full", "loss": res["loss"],
                                 "grad_norm": res["grad_norm"], "message": res["message"]})
    peak = bu.peak_rss_mib() / 1024
    records = read_progress(progress)

    def stage_summary(stage, n_stage):
        ev = evaluations(records, stage)
        if not ev:
            return None
        secs = np.asarray([r["seconds"] for r in ev])
        b = best_record(records, stage)
        ends = [r for r in records if r.get("event") == "stage_end" and r.get("stage") == stage]
        return {"n": n_stage, "evaluations": len(ev), "evaluation_seconds_total": float(secs.sum()),
                "seconds_per_evaluation_median": float(np.median(secs)),
                "seconds_per_evaluation_min": float(secs.min()),
                "parts_seconds_median": {
                    k: float(np.median([r["parts"][k] for r in ev if "parts" in r]))
                    for k in ("build", "potrf", "potri", "pullback")
                    if any("parts" in r for r in ev)},
                "loss": b["loss"], "grad_norm": b["grad_norm"],
                "message": ends[-1]["message"] if ends else None,
                "hyperparameters": hypers_of(b["raw"], noise_floor)}

    stages_out = {}
    sub = stage_summary("subset", subset) if subset else None
    if sub is not None:  # a run started by --init has no subset stage
        stages_out["subset"] = sub | stages.get("subset", {})
    stages_out["full"] = stage_summary("full", n) | {"origin": full_origin,
                                                     "attempts_this_session": res["attempts"]}
    del fg, hess_fg  # their n x n arrays: predict() builds its own
    log("test predictions at the optimum ...", flush=True)
    metrics = score_test(res["theta"], sp, noise_floor=noise_floor)
    ev_all = evaluations(records, "subset") + evaluations(records, "full")
    rec = {
        "dataset": dataset, "split": split, "n": n, "d": d, "n_test": int(sp.n_test),
        "model": {"kernel": KERNEL, "mean": "constant", "outputscale": True, "ard": True,
                  "noise_floor": noise_floor, "constraint": "softplus (+ floor for the noise)",
                  "inputs": "z-scored (training statistics)",
                  "targets": "centred on the training mean, not scaled (scale_y=False)"},
        "loss_definition": "-log p(y | theta) / n, 2 pi included (gpadjoint.mll.neg_mll_exact)",
        "loss": res["loss"], "grad_norm": res["grad_norm"], "grad_tol": gtol,
        "converged": res["converged"], "message": res["message"],
        "raw": [float(v) for v in res["theta"]],
        "raw_layout": f"raw_lengthscale[{d}], raw_outputscale, raw_noise, mean",
        "hyperparameters": hypers_of(res["theta"], noise_floor),
        **metrics,
        "test_metrics_units": "target units (posterior by float64 Cholesky; noise in the "
                              "predictive variance)",
        "evaluations": len(ev_all),
        "evaluation_seconds_total": float(sum(r["seconds"] for r in ev_all)),
        "stages": stages_out,
        "peak_rss_gib": round(peak, 3),
        "nxn_array_gib": round(8.0 * n * n / 2**30, 3),
        "memory": mem_msg,
        "agreement_with_neg_mll_exact": agree,
        "init": origin,
        "command": argv, "commit": commit, "machine": bu.machine(), "host": socket.gethostname(),
        "versions": bu.versions() | {"scipy": scipy.__version__},
        "started": started,
        # every session that worked on this progress file (a resumed run has several)
        "sessions": [{k: r.get(k) for k in ("started", "commit", "command")}
                     for r in records if r.get("event") == "start"],
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds_this_session": round(time.perf_counter() - t_start, 1),
        "load_avg_before": load_before, "load_avg_after": load_avg(),
        "progress_file": _relative(progress),
        "blas_threads": blas_threads,
        "script": "scripts/exact_optimum.py",
    }
    from gpadjoint._io import atomic_write

    text = json.dumps(rec, indent=1)
    atomic_write(out_path, lambda fh: fh.write(text), binary=False)
    log(f"wrote {out_path}: loss {res['loss']:.12f}, |g| {res['grad_norm']:.3e}, "
        f"RMSE {metrics['test_rmse']:.6f}, NLL {metrics['test_nll']:.6f}; {res['message']}")
    return rec


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
