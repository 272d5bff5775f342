"""Training loop: full-batch optax steps on :func:`gpadjoint.mll.neg_mll`.

Stage 6 of the pipeline (mll -> **train** -> model).

Two layers, in the manner of optax:

* :func:`make_trainer` returns a :class:`Trainer`, a pure pair ``init(params, key) -> state`` and
  ``step(state) -> (state, metrics)`` over an explicit :class:`TrainState`. The step is compiled
  once: value and gradient of the loss at the current parameters, one optimiser update. Epoch ``e``
  (0-based) draws its probes from ``jax.random.fold_in(key, e)``, so value and gradient share one
  draw and a run is reproducible from its seed. Any ``optax.GradientTransformation`` works.
* :func:`fit` runs the loop around it: history, progress line, non-finite guard, CG diagnostics,
  early stopping and atomic, resumable checkpoints (:mod:`gpadjoint.checkpoint`).

Units: X, y are already normalised (:mod:`gpadjoint.data`) and in the working dtype; the loss is
``-log p(y | theta) / n`` per datum in those units; hyperparameters in the history are
constrained (lengthscales in standardised input units, output scale and noise as variances).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .checkpoint import load_checkpoint, run_fingerprint, save_checkpoint  # noqa: F401 (public)
from .kernels import Params, constrain, init_params
from .matvec import Backend, choose_backend, make_backend
from .mll import MLLConfig, choose_estimator, neg_mll, neg_mll_exact
from .solve import CGConvergenceWarning

_DEFAULT_MLL = MLLConfig()


class TrainState(NamedTuple):
    """Everything a step needs; a pytree (checkpointed as such).

    params: unconstrained :class:`~gpadjoint.kernels.Params` (working dtype).
    opt_state: the optimiser's state.
    epoch: int32 scalar, number of completed epochs.
    key: base PRNG key of the run; epoch e uses ``fold_in(key, e)``.
    last_alpha: (n,) ``K^{-1}(y - mu)`` of the previous epoch, CG's warm start; None when warm
        starts are off.
    """

    params: Params
    opt_state: Any
    epoch: jax.Array
    key: jax.Array
    last_alpha: jax.Array | None


class Trainer(NamedTuple):
    """Pure training functions for one data set (see :func:`make_trainer`).

    init(params, key) -> TrainState; step(state) -> (state, metrics);
    compile(state) -> seconds spent compiling (~0 when already compiled);
    trace_count() -> how often this trainer's step has been traced (stays 1 over any number of
    steps).
    """

    init: Callable[..., TrainState]
    step: Callable[[TrainState], tuple[TrainState, dict]]
    compile: Callable[[TrainState], float]
    trace_count: Callable[[], int]


class EarlyStopping(NamedTuple):
    """Early-stopping rule: stop on a loss plateau.

    Stops when the loss has not fallen more than ``min_delta`` (absolute, per datum) below its
    best value for ``patience`` consecutive epochs.

    The loss is a stochastic estimate (new probes each epoch), so ``min_delta`` should exceed
    its epoch-to-epoch noise.
    """

    patience: int = 10
    min_delta: float = 1e-4


class FitResult(NamedTuple):
    """Outcome of :func:`fit`.

    params: final unconstrained parameters (the last finite ones).
    history: one dict per completed epoch (see :func:`fit`).
    stopped_reason: why the loop ended, in words.
    state: final :class:`TrainState` (resume from it with :meth:`Trainer.step`).
    info: backend and the reason it was chosen, fingerprint, compile seconds, checkpoint path.
    """

    params: Params
    history: list[dict]
    stopped_reason: str
    state: TrainState
    info: dict


class LBFGS(NamedTuple):
    """L-BFGS on a fixed objective: the settings of :func:`make_lbfgs_trainer`.

    With SLQ the probes are drawn once per run (common random numbers), so the loss is one
    deterministic function whose value and gradient agree, and a quasi-Newton step with a line
    search is sound. The direction is ``optax.scale_by_lbfgs``; the step length comes from a
    weak-Wolfe line search that starts at 1 and reuses every evaluation (the accepted point's
    value, gradient and CG solution carry over to the next step, so no point is evaluated
    twice).

    memory_size: curvature pairs kept by L-BFGS.
    max_linesearch_steps: loss evaluations allowed per step before the line search gives up.
    c1: sufficient-decrease (Armijo) constant.
    c2: curvature constant (weak Wolfe); guarantees positive curvature pairs.
    rtol: stop once the loss changes by less than ``rtol * max(1, |loss|)`` per step ...
    patience: ... for this many consecutive steps,
    gtol: or once the gradient's 2-norm (raw parameters, per datum) is at most this.
    refresh: rebuild the preconditioner (held fixed between rebuilds, so that the objective is
        smooth and its gradient exact) once a log hyperparameter has moved more than this since
        it was built; the step then starts from a fresh evaluation.
    max_step: the most any log hyperparameter may move in one step (line-search trial points
        included). Trial points whose CG solve misses ``cg_tol`` are treated as failures.
    metric: None, or a (k, k) matrix M (nested tuples; k = d + 3) under which L-BFGS runs in
        coordinates v with u = M v, u the log hyperparameters (log lengthscales, log output
        scale, log of the noise above its floor, the mean). Its first step is then the Newton
        step of the Hessian (M M^T)^-1. :func:`subset_start` returns one from the exact
        Hessian of the subset's loss at its optimum: the full-data loss per datum has nearly
        the same curvature, which differs by orders of magnitude between a weak input's
        lengthscale and the noise, and identity-scaled L-BFGS spends its costly full-data
        evaluations learning that. None: identity.
    """

    memory_size: int = 10
    max_linesearch_steps: int = 10
    c1: float = 1e-4
    c2: float = 0.9
    rtol: float = 1e-5
    patience: int = 3
    gtol: float = 1e-5
    refresh: float = 1.0
    max_step: float = 5.0
    metric: Any = None


class LBFGSState(NamedTuple):
    """Optimiser state of the L-BFGS trainer (a pytree, checkpointed as such).

    inner: ``optax.scale_by_lbfgs`` state (curvature memory).
    value: loss at the current parameters (NaN until first evaluated).
    grad: its gradient (raw parameters).
    anchor: the parameters the preconditioner is built at (see :class:`LBFGS`).
    metric: the (k, k) coordinate matrix M of :class:`LBFGS` (identity when none was given);
        kept in the state so that a resumed run continues in the same coordinates.
    """

    inner: Any
    value: jax.Array
    grad: Params
    anchor: Params
    metric: jax.Array


# --------------------------------------------------------------------------------------------
# Trainer


def make_trainer(
    X,
    y,
    *,
    backend: Backend,
    mll_config: MLLConfig = _DEFAULT_MLL,
    optimizer: optax.GradientTransformation,
    warm_start: bool = True,
) -> Trainer:
    """Build the pure init/step pair for data ``X`` (n, d) and ``y`` (n,).

    ``warm_start``: start each epoch's CG from the previous epoch's solution (saves iterations
    once the hyperparameters settle; the stopping rule, hence the accuracy, is unchanged).

    A step whose loss, gradient or updated parameters are not all finite returns the input state
    unchanged (``metrics["ok"]`` False); the caller decides what to do.

    The step is jitted once per trainer (a pure function of the state, with the data, backend,
    estimator settings and optimiser closed over) and compiled on the first :meth:`compile` or
    step; nothing is cached at module level, so a trainer's executable lives and dies with it.
    """
    X = jnp.asarray(X)
    y = jnp.asarray(y)
    dtype = X.dtype
    traces = [0]

    def init(params: Params, key) -> TrainState:
        params = Params(*(jnp.asarray(p, dtype) for p in params))
        if params.raw_lengthscale.shape != (X.shape[1],):
            raise ValueError(
                f"params.raw_lengthscale has shape {params.raw_lengthscale.shape}, "
                f"expected ({X.shape[1]},) for d = {X.shape[1]} inputs"
            )
        return TrainState(
            params=params,
            opt_state=optimizer.init(params),
            epoch=jnp.asarray(0, jnp.int32),
            key=key,
            last_alpha=jnp.zeros(X.shape[0], dtype) if warm_start else None,
        )

    def pure_step(state: TrainState, X, y):
        traces[0] += 1  # runs only while tracing
        return _train_step(state, X, y, backend=backend, mll_config=mll_config,
                           optimizer=optimizer)

    jitted = jax.jit(pure_step)
    executables: dict = {}  # this trainer's, by input signature (compile() times the first)

    def executable(state: TrainState):
        sig = _signature((state, X, y))
        if sig not in executables:
            executables[sig] = jitted.lower(state, X, y).compile()
        return executables[sig]

    def compile(state: TrainState) -> float:
        t0 = time.perf_counter()
        executable(state)
        return time.perf_counter() - t0

    def step(state: TrainState):
        return executable(state)(state, X, y)

    return Trainer(init, step, compile, lambda: traces[0])


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (np.shape(a), str(getattr(a, "dtype", type(a))), _weak(a)) for a in leaves
    )


def _weak(a) -> bool:
    return bool(getattr(a, "weak_type", False))


def _train_step(state: TrainState, X, y, *, backend, mll_config, optimizer):
    """One epoch: value and gradient at the state's parameters, one optimiser update (traced)."""
    key = jax.random.fold_in(state.key, state.epoch)

    def loss(p):
        return neg_mll(p, X, y, key, backend=backend, config=mll_config, x0=state.last_alpha)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        # L-BFGS's line search needs the value and the loss itself (same probes and key);
        # the other optax transformations ignore these.
        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.params, value=value, grad=grads,
            value_fn=lambda p: loss(p)[0],
        )
    else:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    finite_loss = jnp.isfinite(value)
    finite_grad = jnp.isfinite(gnorm)
    finite_update = _all_finite(new_params)
    ok = finite_loss & finite_grad & finite_update

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    alpha = None
    if state.last_alpha is not None:
        alpha = jnp.where(ok & _all_finite(aux["alpha"]), aux["alpha"], state.last_alpha)
    new_state = TrainState(
        params=keep(new_params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        epoch=state.epoch + ok.astype(state.epoch.dtype),
        key=state.key,
        last_alpha=alpha,
    )
    hypers = constrain(state.params, mll_config.noise_floor)
    metrics = {
        "loss": value,
        "grad_norm": gnorm,
        "lengthscale": hypers.lengthscale,
        "outputscale": hypers.outputscale,
        "noise": hypers.noise,
        "mean": state.params.mean,
        "cg_iterations": aux["cg_iterations"],
        "cg_residual": aux["cg_residual"],
        "passes": aux["passes"],
        "ok": ok,
        "finite_loss": finite_loss,
        "finite_grad": finite_grad,
        "finite_update": finite_update,
    }
    return new_state, metrics


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in leaves]))


def make_lbfgs_trainer(
    X,
    y,
    *,
    backend: Backend,
    mll_config: MLLConfig = _DEFAULT_MLL,
    lbfgs: LBFGS | None = None,
    warm_start: bool = True,
) -> Trainer:
    """Build the init/step pair of L-BFGS on a fixed-probe objective (see :class:`LBFGS`).

    One step is one L-BFGS iteration: the direction from ``optax.scale_by_lbfgs``, then a
    weak-Wolfe line search of at most ``lbfgs.max_linesearch_steps`` evaluations of
    ``value_and_grad(neg_mll)``, each compiled once and warm-started (CG) from the previous
    evaluation's solution. All evaluations use the probes of ``fold_in(key, 0)``: value and
    gradient belong to one deterministic objective over the whole run.

    ``metrics`` of a step, besides those of :func:`make_trainer`'s step: ``evaluations`` (loss
    evaluations this step, line search included), ``refreshed`` (the preconditioner was rebuilt
    at this step's start, so ``loss`` is a new evaluation), ``step_size``, ``new_loss`` and
    ``new_grad_norm`` (at the accepted point), ``linesearch_ok`` (False when no evaluation
    decreased the loss: the state is returned unchanged and the run should stop).
    """
    lbfgs = LBFGS() if lbfgs is None else lbfgs
    X = jnp.asarray(X)
    y = jnp.asarray(y)
    dtype = X.dtype
    direction = optax.scale_by_lbfgs(memory_size=lbfgs.memory_size)
    # optax's update is a few hundred small array ops: compiled once, not dispatched one by one
    lbfgs_update = jax.jit(direction.update)
    # only a preconditioner built at an anchor needs rebuilding (not the exact estimator's)
    anchored = choose_estimator(X.shape[0], mll_config)[0] == "slq" and mll_config.precond_rank > 0
    traces = [0]
    compiled: dict = {}

    def _evaluate(params, key, x0, anchor, X, y):
        traces[0] += 1  # runs only while tracing

        def loss(p):
            return neg_mll(p, X, y, key, backend=backend, config=mll_config, x0=x0,
                           precond_params=anchor)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        keep = ("cg_iterations", "cg_residual", "passes", "alpha")
        return value, grads, {k: aux[k] for k in keep}

    def evaluate(params, key, x0, anchor):
        args = (params, key, x0, anchor, X, y)
        sig = _signature(args)
        exe = compiled.get(sig)
        if exe is None:
            exe = jax.jit(_evaluate).lower(*args).compile()
            compiled[sig] = exe
        return exe(*args)

    def init(params: Params, key) -> TrainState:
        params = Params(*(jnp.asarray(p, dtype) for p in params))
        if params.raw_lengthscale.shape != (X.shape[1],):
            raise ValueError(
                f"params.raw_lengthscale has shape {params.raw_lengthscale.shape}, "
                f"expected ({X.shape[1]},) for d = {X.shape[1]} inputs"
            )
        k = X.shape[1] + 3
        metric = np.eye(k) if lbfgs.metric is None else np.asarray(lbfgs.metric, np.float64)
        if metric.shape != (k, k) or not np.all(np.isfinite(metric)):
            raise ValueError(
                f"LBFGS.metric must be a finite ({k}, {k}) matrix for d = {X.shape[1]} inputs "
                f"(log lengthscales, log output scale, log noise, mean), got shape {metric.shape}"
            )
        opt_state = LBFGSState(
            inner=direction.init(jnp.zeros(k)),
            value=jnp.asarray(jnp.nan, dtype),
            grad=jax.tree.map(jnp.zeros_like, params),
            anchor=params,
            metric=jnp.asarray(metric),
        )
        return TrainState(
            params=params,
            opt_state=opt_state,
            epoch=jnp.asarray(0, jnp.int32),
            key=key,
            last_alpha=jnp.zeros(X.shape[0], dtype) if warm_start else None,
        )

    def compile(state: TrainState) -> float:
        t0 = time.perf_counter()
        key = jax.random.fold_in(state.key, 0)
        args = (state.params, key, state.last_alpha, state.opt_state.anchor, X, y)
        sig = _signature(args)
        if sig not in compiled:
            compiled[sig] = jax.jit(_evaluate).lower(*args).compile()
        return time.perf_counter() - t0

    def step(state: TrainState):
        key = jax.random.fold_in(state.key, 0)  # the same probes at every evaluation
        s = state.opt_state
        params, x0, anchor = state.params, state.last_alpha, s.anchor
        counts = {"evaluations": 0, "cg_iterations": 0, "passes": 0, "cg_residual": 0.0}

        def run(p, x0):
            v, g, aux = evaluate(p, key, x0, anchor)
            v, g, aux = jax.device_get((v, g, aux))
            counts["evaluations"] += 1
            counts["cg_iterations"] += int(aux["cg_iterations"])
            counts["passes"] += int(aux["passes"])
            counts["cg_residual"] = max(counts["cg_residual"], float(aux["cg_residual"]))
            finite = bool(np.isfinite(v)) and _tree_finite(g)
            solved = float(aux["cg_residual"]) <= mll_config.cg_tol
            alpha = aux["alpha"]
            if x0 is not None and finite and solved and np.all(np.isfinite(alpha)):
                x0 = jnp.asarray(alpha, dtype)
            return float(v), g, finite, solved, x0

        value, grad = float(s.value), s.grad
        moved = _moved(params, anchor)
        refreshed = anchored and bool(moved > lbfgs.refresh) and bool(np.isfinite(value))
        if refreshed:  # the preconditioner is stale: rebuild it here
            anchor, value = params, math.nan
        counts["refreshed"] = refreshed
        finite = np.isfinite(value)
        if not finite:  # first step, or a new preconditioner
            value, grad, finite, _, x0 = run(params, x0)
        gnorm = _tree_norm(grad)
        metrics = _lbfgs_metrics(state.params, value, gnorm, mll_config, finite)
        if not finite:
            metrics.update(counts, linesearch_ok=False, step_size=0.0, new_loss=value,
                           new_grad_norm=gnorm)
            return state, metrics

        # L-BFGS steps in the coordinates of to_opt: inverse lengthscales, log output scale,
        # log of the noise above its floor, the mean itself (see to_opt for why)
        # ... and in coordinates v with u = M v (LBFGS.metric): gradient M^T g_u there, and a
        # direction d_v maps back to M d_v
        M = np.asarray(jax.device_get(s.metric), np.float64)
        u, gu = to_opt(params), opt_grad(grad, params)
        v, gv = np.linalg.solve(M, _flat(u)), M.T @ _flat(gu)
        upd, inner = lbfgs_update(jnp.asarray(gv), s.inner, jnp.asarray(v))
        desc = _unflat(M @ -np.asarray(jax.device_get(upd)), u)
        slope = _tree_vdot(gu, desc)
        if not (np.isfinite(slope) and slope < 0):  # lost descent: restart from the gradient
            inner = direction.init(jnp.asarray(v))
            scale = min(1.0, 1.0 / max(float(np.linalg.norm(gv)), 1e-30))
            desc = _unflat(M @ (-scale * gv), u)
            slope = _tree_vdot(gu, desc)

        # no coordinate moves by more than max_step in one step (an inverse lengthscale by
        # INV_LS_STEP): a wild trial point (noise at its floor, say) costs a CG run that cannot
        # converge and teaches nothing
        caps = Params(INV_LS_STEP, lbfgs.max_step, lbfgs.max_step, lbfgs.max_step)
        t_max = min(float(c / max(np.max(np.abs(a)), 1e-30)) for c, a in zip(caps, desc))
        t, lo, hi = min(1.0, t_max), 0.0, math.inf
        best = None  # (t, value, grad, params, log-coordinate grad) of the best Armijo point
        wolfe = False
        for _ in range(lbfgs.max_linesearch_steps):
            p_t = Params(*(np.asarray(a, dtype) for a in from_opt(
                Params(*(a + t * b for a, b in zip(u, desc))))))  # in the working dtype
            v_t, g_t, fin_t, solved_t, x0_t = run(p_t, x0)
            x0 = x0_t
            # an unconverged CG solve gives an inexact value: such a point is not taken
            fin_t = fin_t and solved_t
            if not fin_t or v_t > value + lbfgs.c1 * t * slope:
                hi = t  # too long: interpolate (quadratic model), kept inside (lo, hi)
                if fin_t:
                    denom = 2.0 * (v_t - value - slope * t)
                    t_q = -slope * t * t / denom if denom > 0 else 0.5 * (lo + hi)
                else:
                    t_q = lo + 0.25 * (hi - lo)
                t = min(max(t_q, lo + 0.1 * (hi - lo)), lo + 0.5 * (hi - lo))
                continue
            gu_t = opt_grad(g_t, p_t)
            best = (t, v_t, g_t, p_t, gu_t)
            if _tree_vdot(gu_t, desc) >= lbfgs.c2 * slope:
                wolfe = True
                break
            if t >= t_max:
                break  # as long as allowed: take it
            lo = t  # still steep: too short
            t = min(2.0 * t, t_max) if math.isinf(hi) else 0.5 * (lo + hi)

        if best is None:
            metrics.update(counts, linesearch_ok=False, step_size=0.0, new_loss=value,
                           new_grad_norm=gnorm)
            kept = LBFGSState(s.inner, jnp.asarray(value, dtype), grad, anchor, s.metric)
            return TrainState(state.params, kept, state.epoch, state.key, x0), metrics
        t, v_new, g_new, p_new, gu_new = best
        sy = t * (_tree_vdot(gu_new, desc) - slope)
        if not (wolfe or sy > 0):
            # no positive curvature pair: forget
            inner = direction.init(jnp.asarray(np.linalg.solve(M, _flat(to_opt(p_new)))))
        new_params = Params(*(jnp.asarray(a, dtype) for a in p_new))
        new_grad = Params(*(jnp.asarray(a, dtype) for a in g_new))
        new_state = TrainState(
            params=new_params,
            opt_state=LBFGSState(inner, jnp.asarray(v_new, dtype), new_grad, anchor, s.metric),
            epoch=state.epoch + 1,
            key=state.key,
            last_alpha=x0,
        )
        metrics.update(counts, linesearch_ok=True, step_size=t, new_loss=v_new,
                       new_grad_norm=_tree_norm(g_new))
        return new_state, metrics

    return Trainer(init, step, compile, lambda: traces[0])


_constrain_jit = jax.jit(constrain, static_argnums=1)


def _positive(raw) -> np.ndarray:
    return np.logaddexp(np.asarray(raw, np.float64), 0.0)  # softplus


# A subset fit whose noise is within this factor of the floor interpolates its rows (kin40k:
# 2000 rows gave noise 1e-4 and output scale 26, where rank-300 CG on all 36 000 rows stood at
# residual 0.2 after 213 iterations; near the best known fit, noise 0.0067, it took 102:
# results/cg_cost/kin40k-split0.json)
INTERPOLATING_NOISE = 10.0


class SubsetStartWarning(RuntimeWarning):
    """The subset start found an interpolating fit: a poor, ill-conditioned start."""


# The z-scored inputs span a few units: a lengthscale beyond INPUT_RANGE barely changes K
INPUT_RANGE = 3.0
INV_LS_STEP = 1.0  # the most an inverse lengthscale moves in one L-BFGS step
_MIN_INV_LS = 1e-12


def to_opt(p: Params) -> Params:
    """Raw parameters -> the L-BFGS coordinates (1/lengthscale, log scales, the mean).

    The coordinates: 1/lengthscale, log output scale, log(noise - floor), the mean. Log
    coordinates for the scales: a value of 0.7 or of 200 is a few units away, not 200
    softplus units (elevators, 300 rows, exact loss: 96 evaluations to |g| 1e-5 instead of 221
    to 3e-4). The *inverse* lengthscale for each input: the kernel depends on x / l, so a weak
    input's lengthscale falling from 400 to 100 is a move of 0.0075 there and an unimportant
    input sits at 0, a regular point (the loss is even in 1/l), where in log l it is a long
    walk down a slope whose gradient vanishes like 1/l^2 (the full elevators fit crawled along
    that at ~1e-5 nats per step while the fixed-probe objective was still 4e-3 above its value
    at the exact optimum).
    """
    return Params(1.0 / _positive(p.raw_lengthscale), np.log(_positive(p.raw_outputscale)),
                  np.log(_positive(p.raw_noise)), np.asarray(p.mean, np.float64))


def _softplus_inv(y):
    y = np.asarray(y, np.float64)
    return y + np.log(-np.expm1(-y))


def from_opt(u: Params) -> Params:
    """Inverse of :func:`to_opt` (an inverse lengthscale's sign does not matter)."""
    inv = np.maximum(np.abs(np.asarray(u.raw_lengthscale, np.float64)), _MIN_INV_LS)
    return Params(_softplus_inv(1.0 / inv), _softplus_inv(np.exp(u.raw_outputscale)),
                  _softplus_inv(np.exp(u.raw_noise)), np.asarray(u.mean, np.float64))


def opt_grad(g: Params, p: Params) -> Params:
    """Gradient in :func:`to_opt` coordinates from the raw gradient ``g`` at ``p``."""

    def dlog(gr, r):  # d raw / d log y = y / sigmoid(raw) with y = softplus(raw)
        y = _positive(r)
        return np.asarray(gr, np.float64) * y / -np.expm1(-y)

    ls = _positive(p.raw_lengthscale)  # d raw / d (1/l) = -l^2 / sigmoid(raw)
    g_inv = np.asarray(g.raw_lengthscale, np.float64) * -ls * ls / -np.expm1(-ls)
    return Params(g_inv, dlog(g.raw_outputscale, p.raw_outputscale),
                  dlog(g.raw_noise, p.raw_noise), np.asarray(g.mean, np.float64))


def _moved(p: Params, anchor: Params) -> float:
    """Return how far ``p`` is from ``anchor``, as the preconditioner sees it.

    The largest change of a log scale, a lengthscale's weighted by min(1, INPUT_RANGE / l): a
    lengthscale far beyond the inputs' range changes K, and so the preconditioner's quality,
    very little.
    """
    la, lb = _positive(p.raw_lengthscale), _positive(anchor.raw_lengthscale)
    w = np.minimum(1.0, INPUT_RANGE / np.minimum(la, lb))
    moves = [np.abs(np.log(la) - np.log(lb)) * w,
             np.abs(np.log(_positive(p.raw_outputscale)) - np.log(_positive(
                 anchor.raw_outputscale))),
             np.abs(np.log(_positive(p.raw_noise)) - np.log(_positive(anchor.raw_noise)))]
    return float(max(np.max(m) for m in moves))


def _flat(p: Params) -> np.ndarray:
    """[lengthscale part (d), output scale, noise, mean] of a Params-shaped tree, one vector."""
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in p])


def _unflat(vec, like: Params) -> Params:
    """Inverse of :func:`_flat`, shaped like ``like``."""
    d = np.size(like.raw_lengthscale)
    vec = np.asarray(vec, np.float64)
    return Params(vec[:d], vec[d], vec[d + 1], vec[d + 2])


def _tree_vdot(a, b) -> float:
    return float(sum(np.vdot(np.asarray(x), np.asarray(z)) for x, z in zip(
        jax.tree.leaves(a), jax.tree.leaves(b))))


def _tree_norm(a) -> float:
    return math.sqrt(_tree_vdot(a, a))


def _tree_finite(a) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(a))


def _lbfgs_metrics(params: Params, value: float, gnorm: float, cfg: MLLConfig, ok: bool):
    hypers = jax.device_get(_constrain_jit(params, cfg.noise_floor))
    return {
        "loss": value,
        "grad_norm": gnorm,
        "lengthscale": hypers.lengthscale,
        "outputscale": hypers.outputscale,
        "noise": hypers.noise,
        "mean": params.mean,
        "ok": ok,
        "finite_loss": bool(np.isfinite(value)),
        "finite_grad": bool(np.isfinite(gnorm)),
        "finite_update": True,
    }


def subset_start(
    X, y, params0: Params, *, kernel: str, size: int, seed: int, noise_floor: float,
    max_size: int | None = None,
    max_steps: int = 200,
    metric: bool = True,
    metric_floor: float = 1e-4,
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

    ``info["metric"]`` is the coordinate matrix for :class:`LBFGS` (``metric``): M = Q
    diag(lambda)^-1/2 from the forward-difference Hessian of the last subset's loss per datum at
    its optimum, in the trainer's coordinates (:func:`to_opt`; k + 1 more exact evaluations),
    made eigenvalues positive and floored at ``metric_floor`` times the largest; with
    ``metric=False`` it is left out (:func:`subset_metric` computes it later, when needed).
    """
    n = X.shape[0]
    dtype = jnp.asarray(X).dtype
    if size >= n:
        return params0, {"size": n, "skipped": f"size {size} >= n = {n}"}
    max_size = size if max_size is None else max_size
    t0 = time.perf_counter()
    params = Params(*(jnp.asarray(p, jnp.float64) for p in params0))
    stages = []
    while True:
        Xs, ys = _subset_rows(X, y, seed, size)
        t = time.perf_counter()
        res = fit(
            Xs, ys, kernel=kernel, backend="dense",
            mll_config=MLLConfig(estimator="exact", noise_floor=noise_floor),
            optimizer=LBFGS(rtol=1e-7, gtol=1e-5), epochs=max_steps, params0=params,
            progress=False,
        )
        params = res.params
        fitted = constrain(params, noise_floor)
        noise, outputscale = float(fitted.noise), float(fitted.outputscale)
        interpolating = noise <= INTERPOLATING_NOISE * noise_floor
        stages.append({
            "size": size, "steps": len(res.history),
            "evaluations": sum(r["evaluations"] for r in res.history),
            "loss": res.history[-1]["new_loss"] if res.history else None,
            "stopped_reason": res.stopped_reason, "noise": noise, "outputscale": outputscale,
            "interpolating": interpolating, "seconds": time.perf_counter() - t})
        if not (interpolating and 2 * size <= max_size and 2 * size < n):
            break
        size *= 2
    if interpolating:
        warnings.warn(SubsetStartWarning(
            f"the exact fit of {size} random rows puts the noise at {noise:.2e}, within "
            f"{INTERPOLATING_NOISE:g}x its floor ({noise_floor:g}): those rows are interpolated, "
            f"and K of all {n} rows has a condition number ~ n * outputscale / noise = "
            f"{n * outputscale / noise:.0e}, so each CG solve of the full fit may run to "
            "cg_max_iter. Raise init_subset_max, or set init_subset = 0 to start from `init`."),
            stacklevel=2)
    info = {
        "size": size,
        "seed": seed,
        "steps": sum(st["steps"] for st in stages),
        "evaluations": sum(st["evaluations"] for st in stages),
        "loss": stages[-1]["loss"],
        "stopped_reason": stages[-1]["stopped_reason"],
        "noise": noise,
        "outputscale": outputscale,
        "interpolating": interpolating,
        "stages": stages,
        "seconds": time.perf_counter() - t0,
    }
    out = Params(*(jnp.asarray(p, dtype) for p in params))
    if metric:
        info = subset_metric(X, y, out, info, kernel=kernel, noise_floor=noise_floor,
                             metric_floor=metric_floor)
    return out, info


def _subset_rows(X, y, seed: int, size: int):
    """float64 (X, y) of the first ``size`` rows of the seed's permutation, in row order.

    One permutation per seed, so the subsets of growing size are nested.
    """
    rows = np.sort(np.random.default_rng(seed).permutation(X.shape[0])[:size])
    return (jnp.asarray(np.asarray(X)[rows], jnp.float64),
            jnp.asarray(np.asarray(y)[rows], jnp.float64))


def subset_metric(X, y, params: Params, info: dict, *, kernel: str, noise_floor: float,
                  metric_floor: float = 1e-4) -> dict:
    """Return ``info`` of :func:`subset_start` with the L-BFGS ``metric`` at ``params`` added.

    The rows are the subset's (``info["size"]`` and ``info["seed"]``); the k + 1 exact
    evaluations and their seconds are added to ``info``'s.
    """
    t0 = time.perf_counter()
    Xs, ys = _subset_rows(X, y, info["seed"], info["size"])
    p64 = Params(*(jnp.asarray(p, jnp.float64) for p in params))
    metric, lam = _hessian_metric(Xs, ys, p64, kernel, noise_floor, metric_floor)
    return info | {
        "evaluations": info["evaluations"] + len(lam) + 1,
        "hessian_eigenvalues": [float(lam.min()), float(lam.max())],
        "metric": tuple(tuple(float(a) for a in row) for row in metric),
        "seconds": info["seconds"] + time.perf_counter() - t0,
    }


def _hessian_metric(X, y, params: Params, kernel: str, noise_floor: float, floor: float,
                        step: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(M, eigenvalues): M M^T is the inverse of the exact loss's Hessian in log coordinates."""
    fg = jax.jit(jax.value_and_grad(
        lambda p: neg_mll_exact(p, X, y, kernel=kernel, noise_floor=noise_floor)))
    like = to_opt(params)

    def grad_u(u):
        p = from_opt(_unflat(u, like))
        _, g = fg(Params(*(jnp.asarray(a, jnp.float64) for a in p)))
        return _flat(opt_grad(jax.device_get(g), p))

    u0 = _flat(like)
    g0 = grad_u(u0)
    H = np.empty((u0.size, u0.size))
    for j in range(u0.size):
        u = u0.copy()
        u[j] += step
        H[:, j] = (grad_u(u) - g0) / step
    lam, Q = np.linalg.eigh(0.5 * (H + H.T))
    top = max(float(np.max(np.abs(lam))), 1e-300)
    return Q / np.sqrt(np.maximum(np.abs(lam), floor * top)), lam


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


# --------------------------------------------------------------------------------------------
# fit


def fit(
    X,
    y,
    *,
    kernel: str = "matern32",
    backend: Backend | str = "auto",
    mll_config: MLLConfig | None = None,
    optimizer: optax.GradientTransformation | None = None,
    epochs: int,
    params0: Params | None = None,
    seed: int = 0,
    early_stopping: EarlyStopping | None = None,
    checkpoint_path=None,
    checkpoint_every: int = 10,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable[[dict, TrainState], Any] | None = None,
    warm_start: bool = True,
    settings: Mapping | None = None,
    log_every: int = 1,
    converge_tol: float = 1e-5,
) -> FitResult:
    """Fit GP hyperparameters by minimising ``neg_mll`` for ``epochs`` full-batch steps.

    Args:
        X: (n, d) normalised inputs, float32 or float64 (the working dtype of the run).
        y: (n,) normalised targets, same dtype.
        kernel: kernel name; must match ``backend.kernel`` when a Backend is passed.
        backend: a :class:`~gpadjoint.matvec.Backend`, a backend name, or "auto"
            (:func:`~gpadjoint.matvec.choose_backend`; the choice and its reason are in
            ``info``).
        mll_config: estimator settings (default :class:`~gpadjoint.mll.MLLConfig`).
        optimizer: any optax transformation (default ``optax.adam(0.05)``).
        epochs: total number of epochs of the run (including those of a resumed checkpoint).
        params0: starting unconstrained parameters (default: raw values 0).
        seed: the run's PRNG seed (probes of epoch e from ``fold_in(PRNGKey(seed), e)``).
        early_stopping: :class:`EarlyStopping` or None (off).
        checkpoint_path: file to write checkpoints to (atomically), or None.
        checkpoint_every: epochs between checkpoints (0: only when the loop ends, which always
            writes one).
        resume: continue from ``checkpoint_path`` (must exist and match this run's fingerprint).
        progress: None: a progress line on stderr when stderr is a TTY; True: always (one line
            every ``log_every`` epochs when not a TTY); False: silent.
        callback: called as ``callback(record, state)`` after each epoch; returning True stops.
        warm_start: CG starts from the previous epoch's solution.
        settings: extra JSON-serialisable settings (e.g. the run's config without its epoch
            count) stored in the checkpoint fingerprint; a resume must pass equal settings.
        log_every: epochs between progress lines when not on a TTY.
        converge_tol: with the exact (deterministic) estimator and no ``early_stopping``
            given, stop once the loss has not improved by ``converge_tol`` for 5 epochs
            (converged); 0 turns this off. Ignored with SLQ, whose loss is stochastic.

    Returns:
        :class:`FitResult`. History records (one per completed epoch): ``epoch`` (1-based),
        ``loss`` (per datum), ``grad_norm`` (of the raw parameters), ``lengthscale`` (list),
        ``outputscale``, ``noise``, ``mean`` -- all evaluated at the parameters *entering* that
        epoch, so loss and hyperparameters belong together -- then ``cg_iterations``,
        ``cg_residual`` (relative), ``cg_converged``, ``passes`` (passes over the n^2 kernel
        pairs for that value and gradient; 0 for the exact estimator) and ``seconds`` (wall
        time of the step,
        compilation excluded; it is in ``info["compile_seconds"]``).

    A non-finite loss, gradient or update stops the loop before that update is applied: the
    result holds the last finite parameters and ``stopped_reason`` names the epoch and cause.
    """
    X = jnp.asarray(X)
    y = jnp.asarray(y)
    _check_data(X, y)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be an int, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    n, d = X.shape
    dtype = X.dtype
    mll_config = MLLConfig() if mll_config is None else mll_config
    optimizer = optax.adam(0.05) if optimizer is None else optimizer
    backend, backend_reason = _resolve_backend(backend, kernel, n, dtype)
    estimator, estimator_reason = choose_estimator(n, mll_config)
    if estimator == "exact" and early_stopping is None and converge_tol > 0:
        early_stopping = EarlyStopping(patience=5, min_delta=float(converge_tol))

    if isinstance(optimizer, LBFGS):
        trainer = make_lbfgs_trainer(
            X, y, backend=backend, mll_config=mll_config, lbfgs=optimizer, warm_start=warm_start
        )
        early_stopping = None  # L-BFGS has its own stop rule (LBFGS.rtol, patience, gtol)
    else:
        trainer = make_trainer(
            X, y, backend=backend, mll_config=mll_config, optimizer=optimizer,
            warm_start=warm_start,
        )
    params0 = init_params(d, dtype) if params0 is None else params0
    state = trainer.init(params0, jax.random.PRNGKey(seed))
    fingerprint = run_fingerprint(X, y, kernel, backend, mll_config, seed, state, settings)

    history: list[dict] = []
    if resume:
        state, history = load_checkpoint(checkpoint_path, state, fingerprint)

    compile_seconds = trainer.compile(state)
    info = {
        "backend": backend.name,
        "backend_reason": backend_reason,
        "estimator": estimator,
        "estimator_reason": estimator_reason,
        "kernel": kernel,
        "dtype": str(dtype),
        "n": n,
        "d": d,
        "seed": seed,
        "compile_seconds": compile_seconds,
        "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
        "resumed_from_epoch": int(state.epoch) if resume else None,
        "fingerprint": fingerprint,
    }

    bar = _Progress(epochs, progress, log_every)
    bar.note(
        f"gpadjoint fit: n={n} d={d} {dtype} kernel={kernel} backend={backend.name} "
        f"({backend_reason}); estimator {estimator} ({estimator_reason}); "
        f"step compiled in {compile_seconds:.1f} s"
    )
    best, wait = _replay_early_stopping(history, early_stopping)
    lbfgs_stop = _LBFGSStop(optimizer, history) if isinstance(optimizer, LBFGS) else None
    cg_warned = False
    stopped_reason = f"completed {epochs} epochs"
    start = int(state.epoch)
    if early_stopping is not None and wait >= early_stopping.patience:
        start = epochs  # the checkpointed run had already stopped early
        stopped_reason = _early_reason(len(history), early_stopping, best)
    elif lbfgs_stop is not None and lbfgs_stop.reason:
        start = epochs  # the checkpointed run had already converged
        stopped_reason = lbfgs_stop.reason
    elif start >= epochs:
        stopped_reason = f"the checkpoint is already at epoch {start} (epochs={epochs})"

    for e in range(start, epochs):
        t0 = time.perf_counter()
        new_state, m = trainer.step(state)
        m = jax.device_get(m)
        seconds = time.perf_counter() - t0
        if not m["ok"]:
            stopped_reason = _nonfinite_reason(e + 1, m)
            break
        if not m.get("linesearch_ok", True):
            state = new_state
            stopped_reason = (
                f"L-BFGS line search found no decrease of the loss in {m['evaluations']} "
                f"evaluations at step {e + 1} (gradient norm {float(m['grad_norm']):.3g}): the "
                "objective is resolved as far as its CG tolerance allows; parameters kept"
            )
            break
        state = new_state
        rec = _record(e + 1, m, seconds, mll_config)
        history.append(rec)
        if not rec["cg_converged"] and not cg_warned:
            cg_warned = True
            bar.break_line()
            warnings.warn(_cg_message(rec, mll_config, dtype), CGConvergenceWarning, stacklevel=2)
        bar.update(rec)
        if checkpoint_path is not None and checkpoint_every and (e + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint_path, state, history, fingerprint)
        if lbfgs_stop is not None and lbfgs_stop.update(rec):
            stopped_reason = lbfgs_stop.reason
            break
        if early_stopping is not None:
            best, wait = _early_update(best, wait, rec["loss"], early_stopping)
            if wait >= early_stopping.patience:
                stopped_reason = _early_reason(e + 1, early_stopping, best)
                break
        if callback is not None and callback(rec, state) is True:
            stopped_reason = f"callback requested a stop after epoch {e + 1}"
            break
    bar.close()
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, state, history, fingerprint, stopped_reason)
    return FitResult(state.params, history, stopped_reason, state, info)


def _check_data(X, y):
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, d), got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    if X.dtype not in (jnp.float32, jnp.float64) or y.dtype != X.dtype:
        raise ValueError(
            f"X and y must share a float32 or float64 dtype (the working dtype), "
            f"got {X.dtype} and {y.dtype}"
        )


def _resolve_backend(backend, kernel, n, dtype) -> tuple[Backend, str]:
    if isinstance(backend, Backend):
        if backend.kernel != kernel:
            raise ValueError(
                f"backend was built for kernel {backend.kernel!r} but fit got kernel={kernel!r}"
            )
        return backend, "given"
    if backend == "auto":
        name, reason = choose_backend(n, dtype)
        return make_backend(name, kernel), f"auto: {reason}"
    return make_backend(backend, kernel), "requested"


class _LBFGSStop:
    """The L-BFGS stop rule over history records (replayed on resume)."""

    def __init__(self, lbfgs: LBFGS, history: list[dict]):
        self.lbfgs = lbfgs
        self.small = 0
        self.reason = ""
        for rec in history:
            self.update(rec)

    def update(self, rec: dict) -> bool:
        if "new_loss" not in rec:
            return False
        cfg = self.lbfgs
        change = abs(rec["new_loss"] - rec["loss"])
        self.small = self.small + 1 if change <= cfg.rtol * max(1.0, abs(rec["loss"])) else 0
        if rec["new_grad_norm"] <= cfg.gtol:
            self.reason = (
                f"converged after step {rec['epoch']}: gradient norm "
                f"{rec['new_grad_norm']:.3g} <= gtol = {cfg.gtol:g}"
            )
        elif self.small >= cfg.patience:
            self.reason = (
                f"converged after step {rec['epoch']}: the loss changed by less than "
                f"rtol = {cfg.rtol:g} (relative) for {cfg.patience} steps"
            )
        return bool(self.reason)


_LBFGS_KEYS = ("evaluations", "step_size", "new_loss", "new_grad_norm", "refreshed")


def _record(epoch: int, m: dict, seconds: float, cfg: MLLConfig) -> dict:
    res = float(m["cg_residual"])
    kinds = {"evaluations": int, "refreshed": bool}
    extra = {k: kinds.get(k, float)(m[k]) for k in _LBFGS_KEYS if k in m}
    return {
        "epoch": epoch,
        "loss": float(m["loss"]),
        "grad_norm": float(m["grad_norm"]),
        "lengthscale": [float(v) for v in np.asarray(m["lengthscale"])],
        "outputscale": float(m["outputscale"]),
        "noise": float(m["noise"]),
        "mean": float(m["mean"]),
        "cg_iterations": int(m["cg_iterations"]),
        "cg_residual": res,
        "cg_converged": bool(res <= cfg.cg_tol),
        "passes": int(m["passes"]),
        "seconds": seconds,
    } | extra


def _nonfinite_reason(epoch: int, m: dict) -> str:
    if not m["finite_loss"]:
        what = f"loss ({float(m['loss'])})"
    elif not m["finite_grad"]:
        what = f"gradient (norm {float(m['grad_norm'])})"
    else:
        what = "parameters after the optimiser update"
    return (
        f"non-finite {what} at epoch {epoch}; stopped and kept the parameters from before "
        f"that epoch (after epoch {epoch - 1})"
    )


def _cg_message(rec: dict, cfg: MLLConfig, dtype) -> str:
    hint = "" if dtype == jnp.float64 else ", or use float64 (model.dtype = 'float64')"
    return (
        f"CG reached relative residual {rec['cg_residual']:.3g} > cg_tol = {cfg.cg_tol:g} after "
        f"cg_max_iter = {cfg.cg_max_iter} iterations at epoch {rec['epoch']}: the loss and its "
        f"gradient are inexact. Raise cg_max_iter or precond_rank{hint}. Later epochs are "
        f"recorded in the history (cg_converged) without a further warning."
    )


def _replay_early_stopping(history, es: EarlyStopping | None):
    best, wait = math.inf, 0
    if es is not None:
        for rec in history:
            best, wait = _early_update(best, wait, rec["loss"], es)
    return best, wait


def _early_update(best, wait, loss, es: EarlyStopping):
    if loss < best - es.min_delta:
        return loss, 0
    return best, wait + 1


def _early_reason(epoch, es: EarlyStopping, best) -> str:
    return (
        f"early stopping after epoch {epoch}: loss did not improve on {best:.6g} by more than "
        f"{es.min_delta:g} for {es.patience} epochs"
    )


class _Progress:
    """A one-line progress display on stderr (no dependency): in place on a TTY."""

    def __init__(self, total: int, enabled: bool | None, log_every: int):
        tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else bool(enabled)
        self.tty = tty
        self.total = total
        self.log_every = max(1, int(log_every))
        self.shown = False

    def note(self, text: str):
        if self.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def update(self, rec: dict):
        if not self.enabled:
            return
        e = rec["epoch"]
        text = (
            f"epoch {e:>{len(str(self.total))}}/{self.total} loss {rec['loss']:+.5f} "
            f"|g| {rec['grad_norm']:.2e} noise {rec['noise']:.3g} cg {rec['cg_iterations']} it "
            f"{rec['seconds']:.2f} s"
        )
        if self.tty:
            width = 20
            done = int(width * e / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
            self.shown = True
        elif e % self.log_every == 0 or e == self.total:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def break_line(self):
        """End an in-place line so that a warning starts on its own line."""
        if self.enabled and self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False

    def close(self):
        if self.enabled and self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
