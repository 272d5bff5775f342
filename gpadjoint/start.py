"""Where a fit starts: initial parameters, the subset ladder, its metric, the full-fit policy.

Data flow: mll -> train -> **start** -> model.

* :func:`initial_params`: named starting parameters (``softplus0``, ``normal``);
* :func:`subset_start`: the exact (float64 Cholesky) L-BFGS fit of random rows, the rows
  doubling while that fit interpolates them (:data:`INTERPOLATING_NOISE`) or leaves the full
  fit's CG ill-conditioned (:data:`CG_RATIO_LIMIT`);
* :func:`subset_metric`: the Hessian metric of the last subset's loss at its optimum, the
  coordinates :class:`gpadjoint.optimizers.LBFGS` then runs the full fit in;
* :func:`full_fit`: whether the full fit runs after that start (``[train] full_fit``);
* :func:`heldout_noise`: for a kept start that interpolates its rows, the noise chosen by the
  predictive likelihood of rows outside the subset.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import add_to_start, data_sha256, load_start, save_start
from .coords import flat, from_opt, hessian_metric, opt_grad, to_opt, unflat
from .kernels import Params, constrain, init_params, unconstrain
from .mll import MLLConfig, neg_mll_exact
from .optimizers import LBFGS, drop_anchor_factors
from .train import fit

# A subset fit whose noise is within this factor of the floor interpolates its rows: CG on all
# rows from such a start converges far more slowly than near the best known fit (kin40k:
# results/cg_cost/kin40k-split0.json)
INTERPOLATING_NOISE = 10.0

# Preconditioned CG on K of all n rows converges in a number of iterations that grows like
# sqrt(kappa), and kappa <= 1 + trace(E) / noise, E = K - L L^T the part of the noise-free K that
# the rank-r preconditioner leaves. Measured: pol split 0 near its optimum ~1.3e5 and 77 CG
# iterations per solve at rank 1000 (results/precond_pivot.csv); protein split 0 from its
# 2000-row fit ~1e7 and no solve within 275 iterations
# (results/uci/protein-split0-gpadjoint-default-blocked-200ep.json keeps the ratios). Both put
# this limit near 100 iterations per solve: above it every evaluation of the full fit costs
# hundreds of passes over K, so a subset fit above it is a costly start.
CG_RATIO_LIMIT = 3e5


# heldout_noise: noise shares of the total variance s2 + noise tried, the held-out rows at most,
# and the margin (nats per held-out row) a new noise must win by to replace the fitted one
HELDOUT_SHARES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
HELDOUT_ROWS = 4000
HELDOUT_MARGIN = 1e-3


class SubsetStartWarning(RuntimeWarning):
    """The subset start found an interpolating fit: a poor, ill-conditioned start."""


def subset_start(
    X, y, params0: Params, *, kernel: str, size: int, seed: int, noise_floor: float,
    max_size: int | None = None,
    max_steps: int = 200,
    metric: bool = True,
    metric_floor: float = 1e-4,
    checkpoint=None,
    resume: bool = False,
    stop: Callable[[], bool] | None = None,
    settings: Mapping | None = None,
    cg_check: Callable[[Params], float] | None = None,
) -> tuple[Params, dict]:
    """Maximum-likelihood parameters of ``size`` random rows, as a start for the full fit.

    The exact estimator (float64 Cholesky, deterministic) with L-BFGS on a subset costs
    seconds, and its optimum is near the full data's in noise, output scale and most
    lengthscales, so the full-data fit starts close and needs far fewer of its costly
    evaluations. Returns ``(params, info)`` with params in the dtype of X; when ``size >= n`` the
    start is ``params0`` unchanged.

    While the fit interpolates its rows (noise within ``INTERPOLATING_NOISE`` times the floor:
    nearly noise-free data, whose optimum moves with n) and ``2 * size <= max_size``, the rows
    double (a superset of the last ones, started from the last fit): on kin40k the 2000-row fit
    scored -0.712 nats/datum on all 36 000 rows and the 4000-row one -0.784
    (``results/optimum/kin40k-split0.points.jsonl``). ``info["stages"]`` has each fit.

    ``cg_check(params) -> ratio`` (params in the dtype of X), when given, measures each rung that
    does not interpolate: trace(E) / noise of the full fit's preconditioner at its fit
    (:func:`precond_ratio`), kept in the stage as ``precond_ratio``. Above
    :data:`CG_RATIO_LIMIT` (``cg_hard``) the rows double too, as for an interpolating fit.

    ``info["metric"]`` is the coordinate matrix for :class:`LBFGS` (``metric``): M = Q
    diag(lambda)^-1/2 from the forward-difference Hessian of the last subset's loss per datum at
    its optimum, in the trainer's coordinates (:func:`to_opt`; k + 1 more exact evaluations),
    made eigenvalues positive and floored at ``metric_floor`` times the largest; with
    ``metric=False`` it is left out (:func:`subset_metric` computes it later, when needed).

    Resumable: with a ``checkpoint`` file (:func:`gpadjoint.checkpoint.start_path` of the run's
    checkpoint) each finished stage is written there atomically with a fingerprint of the data,
    these arguments and ``settings`` (JSON); ``resume=True`` continues after the last finished
    stage of a matching file (refusing another run's; none there: FileNotFoundError), so an
    interrupted start loses at most the stage in progress and ends where an uninterrupted one
    does. ``stop()`` is asked before each stage and each evaluation of a stage's fit: True
    abandons the stage in progress and returns the last finished stage's parameters (params0
    when none) with ``info["interrupted"]`` True.
    """
    n = X.shape[0]
    dtype = jnp.asarray(X).dtype
    if size >= n:
        return params0, {"size": n, "skipped": f"size {size} >= n = {n}"}
    max_size = size if max_size is None else max_size
    t0 = time.perf_counter()
    params = Params(*(jnp.asarray(p, jnp.float64) for p in params0))
    fingerprint = _start_fingerprint(X, y, params, kernel=kernel, size=size, seed=seed,
                                     noise_floor=noise_floor, max_size=max_size,
                                     max_steps=max_steps, metric_floor=metric_floor,
                                     settings=settings)
    stages, extra = [], {}
    if resume:
        params, saved = load_start(checkpoint, params, fingerprint)
        stages, extra = saved.pop("stages"), saved
    check = None if cg_check is None else (
        lambda p: float(cg_check(Params(*(jnp.asarray(a, dtype) for a in p)))))
    params, interrupted = _climb(X, y, params, stages, kernel=kernel, size=size, seed=seed,
                                 noise_floor=noise_floor, max_size=max_size,
                                 max_steps=max_steps, checkpoint=checkpoint,
                                 fingerprint=fingerprint, stop=stop, cg_check=check)
    if interrupted:
        return _interrupted(params0, params, stages, dtype, seed, t0)
    if stages[-1]["interpolating"]:
        _warn_interpolating(stages[-1], n, noise_floor)
    info = _finished(stages, extra, seed, t0)
    out = Params(*(jnp.asarray(p, dtype) for p in params))
    if metric:
        info = subset_metric(X, y, out, info, kernel=kernel, noise_floor=noise_floor,
                             metric_floor=metric_floor, checkpoint=checkpoint)
    return out, info


def _climb(X, y, params: Params, stages: list, *, kernel: str, size: int, seed: int,
           noise_floor: float, max_size: int, max_steps: int, checkpoint, fingerprint: dict,
           stop: Callable[[], bool] | None,
           cg_check: Callable[[Params], float] | None = None) -> tuple[Params, bool]:
    """Fit the ladder's rungs after ``stages`` (appended to in place) -> (params, interrupted).

    The first rung has ``size`` rows when ``stages`` is empty; each later one doubles the last
    while that interpolates or is ``cg_hard`` (``cg_check``), ``2 * size <= max_size`` and
    ``2 * size < n``. Each finished stage
    is written to ``checkpoint`` (if given). ``stop()`` is asked before each stage and inside
    its fit: True returns the last finished stage's parameters with ``interrupted`` True.
    """
    n = X.shape[0]
    while True:
        if stages:  # the ladder goes on while the last rung is a poor or costly start
            done = stages[-1]["size"]
            if not (hard_start(stages[-1]) and 2 * done <= max_size and 2 * done < n):
                break
            size = 2 * done
        if stop is not None and stop():
            return params, True
        drop_anchor_factors()  # an earlier rung's check: not this fit's anchor
        fitted, stage = subset_stage(X, y, params, kernel=kernel, size=size, seed=seed,
                                     noise_floor=noise_floor, max_steps=max_steps, stop=stop)
        if stage.get("interrupted"):  # an unfinished stage is not kept
            return params, True
        params = fitted
        if cg_check is not None and not stage["interpolating"]:
            t0 = time.perf_counter()
            ratio = cg_check(params)
            stage |= {"precond_ratio": ratio, "cg_hard": not ratio <= CG_RATIO_LIMIT,
                      "check_seconds": time.perf_counter() - t0}
        stages.append(stage)
        if checkpoint is not None:
            save_start(checkpoint, params, {"stages": stages}, fingerprint)
    return params, False


def hard_start(stage: Mapping) -> bool:
    """Whether a rung (or a start's info) is a poor or costly start for the full SLQ fit.

    It interpolates its rows, or its ``precond_ratio`` exceeds :data:`CG_RATIO_LIMIT`.
    """
    return bool(stage.get("interpolating") or stage.get("cg_hard"))


def precond_ratio(X, params: Params, *, kernel: str, config: MLLConfig) -> float:
    """trace(E) / noise at ``params``: E = K - L L^T, L the full fit's preconditioner there.

    ``config``: the full fit's [mll] settings (rank, pivots). The factors are built by
    :func:`gpadjoint.optimizers.anchor_factors` and held for a fit anchored at ``params``. With
    ``precond_rank = 0`` there is no L and the ratio is n * outputscale / noise.
    """
    from .optimizers import anchor_factors

    h = constrain(params, config.noise_floor)
    total = X.shape[0] * float(h.outputscale)
    if config.precond_rank == 0:
        return total / float(h.noise)
    L = anchor_factors(X, kernel, config, params).precond.L
    return max(total - float(jnp.sum(L * L)), 0.0) / float(h.noise)


def _finished(stages: list, extra: dict, seed: int, t0: float) -> dict:
    """Return the info of a finished ladder: the last stage's fit, totals, and ``stages``.

    ``extra`` is what a resumed start's checkpoint held besides its stages (a metric computed
    before the interruption: the same numbers again).
    """
    last = stages[-1]
    info = {
        "size": last["size"], "seed": seed,
        "steps": sum(st["steps"] for st in stages),
        "evaluations": sum(st["evaluations"] for st in stages),
        **{k: last[k] for k in ("loss", "stopped_reason", "noise", "outputscale",
                                "interpolating")},
        **{k: last[k] for k in ("precond_ratio", "cg_hard") if k in last},
        "stages": stages,
        "seconds": time.perf_counter() - t0,
    }
    if "metric" in extra:  # computed before the interruption: the same numbers again
        info |= {k: extra[k] for k in ("metric", "hessian_eigenvalues", "evaluations")}
        info["metric"] = tuple(tuple(row) for row in info["metric"])
    return info


def _warn_interpolating(last: dict, n: int, noise_floor: float) -> None:
    """Warn that the last stage interpolates its rows (at the caller of :func:`subset_start`)."""
    size = last["size"]
    warnings.warn(SubsetStartWarning(
        f"the exact fit of {size} random rows puts the noise at {last['noise']:.2e}, within "
        f"{INTERPOLATING_NOISE:g}x its floor ({noise_floor:g}): those rows are interpolated, "
        f"and K of all {n} rows has a condition number ~ n * outputscale / noise = "
        f"{n * last['outputscale'] / last['noise']:.0e}, so each CG solve of the full fit "
        "may run to cg_max_iter. Raise init_subset_max, or set init_subset = 0 to start "
        "from `init`."), stacklevel=3)


def _start_fingerprint(X, y, params0: Params, **given) -> dict:
    """Return what a resumed subset start must match: data, start point, arguments (JSON)."""
    settings = given.pop("settings")
    fp = {"n": int(X.shape[0]), "d": int(X.shape[1]), "dtype": str(jnp.asarray(X).dtype),
          "data_sha256": data_sha256(X, y),
          "params0": [np.asarray(p, np.float64).tolist() for p in params0],
          **given, "settings": None if settings is None else dict(settings)}
    return json.loads(json.dumps(fp))  # as it will be read back (tuples -> lists)


def _interrupted(params0, params, stages, dtype, seed, t0) -> tuple[Params, dict]:
    """Return the start after a stop request: the last finished stage's parameters (or params0)."""
    info = {"size": stages[-1]["size"] if stages else None, "seed": seed,
            "stages": stages, "interrupted": True,
            "stopped_reason": (f"stop requested during the subset start after {len(stages)} "
                               "finished stage(s)"),
            "seconds": time.perf_counter() - t0}
    out = params if stages else params0
    return Params(*(jnp.asarray(p, dtype) for p in out)), info


def subset_stage(X, y, params: Params, *, kernel: str, size: int, seed: int,
                 noise_floor: float, max_steps: int = 200,
                 stop: Callable[[], bool] | None = None) -> tuple[Params, dict]:
    """One rung of the ladder: the exact L-BFGS fit of ``size`` rows from float64 ``params``.

    Returns the fitted float64 parameters and the stage's record (size, steps, evaluations,
    final loss, stop reason, noise, output scale, whether it interpolates, seconds), which has
    ``interrupted`` True when ``stop()`` ended the fit before it finished.
    """
    Xs, ys = _subset_rows(X, y, seed, size)
    t = time.perf_counter()
    res = fit(
        Xs, ys, kernel=kernel, backend="dense",
        mll_config=MLLConfig(estimator="exact", noise_floor=noise_floor),
        optimizer=LBFGS(rtol=1e-7, gtol=1e-5), epochs=max_steps, params0=params,
        progress=False, stop=stop,
    )
    if res.info["stop_requested"]:
        return res.params, {"size": size, "interrupted": True}
    fitted = constrain(res.params, noise_floor)
    noise, outputscale = float(fitted.noise), float(fitted.outputscale)
    return res.params, {
        "size": size, "steps": len(res.history),
        "evaluations": sum(r["evaluations"] for r in res.history),
        "loss": res.history[-1]["new_loss"] if res.history else None,
        "stopped_reason": res.stopped_reason, "noise": noise, "outputscale": outputscale,
        "interpolating": noise <= INTERPOLATING_NOISE * noise_floor,
        "seconds": time.perf_counter() - t}


def _subset_rows(X, y, seed: int, size: int):
    """float64 (X, y) of the first ``size`` rows of the seed's permutation, in row order.

    One permutation per seed, so the subsets of growing size are nested.
    """
    rows = np.sort(np.random.default_rng(seed).permutation(X.shape[0])[:size])
    return (jnp.asarray(np.asarray(X)[rows], jnp.float64),
            jnp.asarray(np.asarray(y)[rows], jnp.float64))


def subset_metric(X, y, params: Params, info: dict, *, kernel: str, noise_floor: float,
                  metric_floor: float = 1e-4, checkpoint=None) -> dict:
    """Return ``info`` of :func:`subset_start` with the L-BFGS ``metric`` at ``params`` added.

    The rows are the subset's (``info["size"]`` and ``info["seed"]``); the k + 1 exact
    evaluations and their seconds are added to ``info``'s. An ``info`` that has a metric (a
    resumed start's) is returned as it is; a new one is added to the start's ``checkpoint``
    file, if given, so that a resumed start does not compute it again.
    """
    if "metric" in info:
        return info
    t0 = time.perf_counter()
    Xs, ys = _subset_rows(X, y, info["seed"], info["size"])
    p64 = Params(*(jnp.asarray(p, jnp.float64) for p in params))
    metric, lam = _exact_hessian_metric(Xs, ys, p64, kernel, noise_floor, metric_floor)
    added = {
        "evaluations": info["evaluations"] + len(lam) + 1,
        "hessian_eigenvalues": [float(lam.min()), float(lam.max())],
        "metric": tuple(tuple(float(a) for a in row) for row in metric),
    }
    if checkpoint is not None:
        add_to_start(checkpoint, added)
    return info | added | {"seconds": info["seconds"] + time.perf_counter() - t0}


def _exact_hessian_metric(X, y, params: Params, kernel: str, noise_floor: float,
                          floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(M, eigenvalues) of :func:`gpadjoint.coords.hessian_metric` for the exact loss per datum.

    In the coordinates of :func:`gpadjoint.coords.to_opt`, at ``params`` (float64).
    """
    fg = jax.jit(jax.value_and_grad(
        lambda p: neg_mll_exact(p, X, y, kernel=kernel, noise_floor=noise_floor)))
    like = to_opt(params)

    def grad_u(u):
        p = from_opt(unflat(u, like))
        _, g = fg(Params(*(jnp.asarray(a, jnp.float64) for a in p)))
        return flat(opt_grad(jax.device_get(g), p))

    return hessian_metric(grad_u, flat(like), step=1e-5, floor=floor)


def initial_params(init: str, d: int, dtype, seed: int = 0) -> Params:
    """Return starting parameters by name.

    ``softplus0``: all raw values 0, i.e. lengthscales and output scale 0.693, noise 0.693 +
    floor; ``normal``: raw values N(0, 1), as the paper.

    ``normal`` draws from a key derived from ``seed`` but distinct from the probes' key.
    """
    if init == "softplus0":
        return init_params(d, dtype)
    if init == "normal":
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x1D17)
        return init_params(d, dtype, key=key)
    raise ValueError(f"unknown init {init!r}; choose 'softplus0' or 'normal'")


def full_fit(mode: str, subset: dict | None, estimator: str, n: int) -> dict:
    """Whether to fit all ``n`` rows after the subset start, and why ([train] full_fit).

    ``mode``: always | never | auto; ``subset``: :func:`subset_start`'s info (None: there was no
    subset start); ``estimator``: the full fit's resolved estimator. Returns ``{"fit": bool,
    "mode": mode, "reason": str}``. ``auto`` keeps a :func:`hard_start` when the estimator is
    SLQ: an interpolating fit gives K of all n rows cond ~ n * outputscale / noise, and a
    ``cg_hard`` one a preconditioned cond up to its ``precond_ratio``; either way every CG solve
    runs long.
    """
    if subset is None:
        return {"fit": True, "mode": mode, "reason": "no subset start"}
    if mode != "auto":
        return {"fit": mode == "always", "mode": mode, "reason": f"full_fit = {mode!r}"}
    if estimator != "slq" or not hard_start(subset):
        return {"fit": True, "mode": mode, "reason": (
            "auto: the subset fit neither interpolates nor leaves CG ill-conditioned"
            if estimator == "slq" else f"auto: the {estimator} estimator does not iterate")}
    tail = ("each CG solve of the SLQ estimator runs hundreds to thousands of passes over K; "
            "the fit keeps it. Set full_fit = 'always' to fit all rows anyway, or raise "
            "init_subset_max")
    if subset.get("interpolating"):
        cond = n * subset["outputscale"] / subset["noise"]
        why = (f"the exact fit of {subset['size']} rows interpolates them (noise "
               f"{subset['noise']:.1e}, within {INTERPOLATING_NOISE:g}x noise_floor), where K "
               f"of all {n} rows has cond ~ n s2 / noise = {cond:.0e}")
    else:
        why = (f"at the exact fit of {subset['size']} rows (noise {subset['noise']:.1e}) the "
               f"preconditioner of all {n} rows leaves trace(K - L L^T) / noise = "
               f"{subset['precond_ratio']:.1e} > {CG_RATIO_LIMIT:.0e} (CG would run ~100 or more "
               "iterations per solve)")
    return {"fit": False, "mode": mode, "reason": f"auto: {why} and {tail}"}


def heldout_noise(X, y, params: Params, subset: dict, *, kernel: str,
                  noise_floor: float, rows: int = HELDOUT_ROWS) -> tuple[Params, dict]:
    """Choose the noise of a kept, interpolating subset fit by held-out predictive likelihood.

    An exact fit that puts the noise at its floor says only that its own rows are consistent
    with no noise: with the lengthscales it chose, few of them are near one another. All n rows
    have many more near neighbours, and the exact posterior that then predicts from all of them
    trusts each one fully, so its predictive variance collapses where the data are noisy. The
    fit's own likelihood cannot see this; the rows it did not use can. So, holding the
    lengthscales and the total variance s2 + noise, this tries the noise shares
    :data:`HELDOUT_SHARES` above the fitted noise, upwards until the score rises, each scored
    by the mean exact predictive NLL, given the subset, of ``rows`` rows outside it (the tail
    of the subset's permutation, disjoint from every rung). The best replaces the fit when it
    wins by more than :data:`HELDOUT_MARGIN`; on nearly noise-free data the fitted noise wins
    and is kept.

    ``subset``: :func:`subset_start`'s info of the kept fit (its ``size`` and ``seed``).
    Returns ``(params, record)``, params in the dtype of X; the record has the rows, each
    share's NLL, the chosen noise and whether it replaced the fit.
    """
    from . import exact
    from .predict import scores

    t0 = time.perf_counter()
    n, size, seed = X.shape[0], subset["size"], subset["seed"]
    m = min(rows, n - size)
    h = constrain(Params(*(jnp.asarray(a, jnp.float64) for a in params)), noise_floor)
    s2, noise = float(h.outputscale), float(h.noise)
    total = s2 + noise
    Xs, ys = (np.asarray(a) for a in _subset_rows(X, y, seed, size))
    hold = np.sort(np.random.default_rng(seed).permutation(n)[n - m:])
    Xh, yh = np.asarray(X, np.float64)[hold], np.asarray(y, np.float64)[hold]

    def score(noise_i: float) -> float:
        hi = h._replace(outputscale=jnp.asarray(total - noise_i), noise=jnp.asarray(noise_i))
        f = exact.factor(Xs, ys, hi, float(params.mean), kernel=kernel)
        return scores(yh, *exact.posterior(f, Xh))[1]

    fitted = score(noise)
    tried, last = {}, fitted
    for share in HELDOUT_SHARES:
        if share * total <= max(noise, noise_floor):
            continue
        tried[share] = score(share * total)
        if tried[share] > last:  # past the minimum (the NLL is unimodal in the share here)
            break
        last = tried[share]
    best = min(tried, key=tried.get, default=None)
    adopt = best is not None and fitted - tried[best] > HELDOUT_MARGIN
    record = {"rows": m, "fitted_noise": noise, "fitted_nll": fitted,
              "shares": {f"{k:g}": v for k, v in tried.items()}, "replaced": adopt,
              "noise": best * total if adopt else noise}
    if adopt:
        q = unconstrain(h.lengthscale, total * (1 - best), total * best, float(params.mean),
                        noise_floor=noise_floor, dtype=jnp.float64)
        params = Params(*(jnp.asarray(a, X.dtype) for a in (
            params.raw_lengthscale, q.raw_outputscale, q.raw_noise, params.mean)))
    record["seconds"] = time.perf_counter() - t0
    return params, record
