"""Optimisers: one small protocol, two implementations, and the [optim] factory.

Data flow: mll -> **optimizers** -> train -> model. An optimiser is a value with

* ``trainer(X, y, *, backend, mll_config, warm_start) -> Trainer``: the pure pair
  ``init(params, key) -> TrainState`` and ``step(state) -> (state, metrics)`` for one data set;
* ``stop_rules(early_stopping) -> list``: the :mod:`gpadjoint.stops` rules that end its run;
* ``takes_metric``: whether it runs in the coordinates of a Hessian metric
  (:meth:`LBFGS.with_metric`), so that the start computes one only when it is used.

Two exist: :class:`Optax` wraps any ``optax.GradientTransformation`` (one update per epoch,
epoch e's probes from ``fold_in(key, e)``); :class:`LBFGS` is L-BFGS with a weak-Wolfe line
search on the fixed-probe objective (:mod:`gpadjoint.lbfgs` has its pure parts).
:func:`as_optimizer` turns what :func:`gpadjoint.train.fit` is given into one of them;
:func:`make_optimizer` builds one from a :class:`gpadjoint.config.OptimConfig` and
:func:`resolve_optimizer` says what ``optimizer = "auto"`` means and why.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import coords
from . import lbfgs as host
from .config import OptimConfig
from .kernels import Params, constrain
from .matvec import Backend
from .mll import MLLConfig, neg_mll, precond_factors
from .stops import Converged, EarlyStopping, Plateau, PredictedDecrease

# One DEBUG record per loss evaluation and per preconditioner build (what an L-BFGS step spends
# its time on, inside the step); the structured fields ride in ``extra={"evaluation": {...}}``.
logger = logging.getLogger("gpadjoint")

_DEFAULT_MLL = MLLConfig()

# A line search's trial point may run at most TRIAL_CG_FACTOR x the accepted point's CG
# iterations + TRIAL_CG_SLACK: a step into an ill-conditioned region (the noise far below the
# anchor's) can need cg_max_iter iterations and still not solve, each costing one pass over K;
# stopped at the bound, it is an unsolved trial like any other and the search shortens the step.
# Legitimate growth along a step stays inside the bound (keggdirected: 39 -> 109, 1 -> 80).
TRIAL_CG_FACTOR = 4
TRIAL_CG_SLACK = 100

# A preconditioner built before a fit at what will be its first anchor (the subset start's check
# of its last rung, :func:`anchor_factors`), taken by the first evaluator that asks for the same
# one, so that it is not built twice. At most one is held.
_HANDOFF: dict = {}


def _anchor_tag(anchor: Params) -> bytes:
    """Return the bytes that identify an anchor (the parameters a preconditioner was built at)."""
    return b"".join(np.asarray(a).tobytes() for a in jax.tree.leaves(anchor))


def _factors_key(X, kernel: str, cfg: MLLConfig, anchor: Params) -> tuple:
    """Return what makes two preconditioners the same: data, kernel, settings, anchor."""
    import hashlib

    data = hashlib.sha256(np.asarray(X).tobytes()).hexdigest()
    return (kernel, X.shape, str(X.dtype), data, _anchor_tag(anchor), cfg.precond_rank,
            cfg.precond_pivot, cfg.precond_logdet, cfg.noise_floor)


@functools.cache
def _factors_builder(kernel: str, cfg: MLLConfig) -> Callable:
    """Return the jitted ``(X, h0) -> PrecondFactors`` of these settings.

    One function per settings, so the start's check and the fit's evaluator compile it once.
    """
    return jax.jit(lambda X, h0: precond_factors(X, kernel, h0, cfg))


def anchor_factors(X, kernel: str, cfg: MLLConfig, anchor: Params):
    """Build the :class:`~gpadjoint.mll.PrecondFactors` of ``anchor`` and hold them for the fit.

    The next :class:`_Evaluator` anchored at the same parameters (same data, kernel and
    preconditioner settings) takes them instead of building its own; a later call replaces them,
    :func:`drop_anchor_factors` frees them.
    """
    X = jnp.asarray(X)
    h0 = constrain(anchor, cfg.noise_floor)
    factors = jax.block_until_ready(_factors_builder(kernel, cfg)(X, h0))
    _HANDOFF.clear()
    _HANDOFF[_factors_key(X, kernel, cfg, anchor)] = factors
    return factors


def drop_anchor_factors() -> None:
    """Free a preconditioner :func:`anchor_factors` holds (no fit will take it)."""
    _HANDOFF.clear()


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

    init(params, key) -> TrainState; step(state, stop=None) -> (state, metrics), where
    ``stop()`` is asked before each loss evaluation of a step: when it returns
    True the step is abandoned, and the state comes back exactly as it went in with
    ``metrics["interrupted"]`` True (the optax step makes one evaluation, so it never asks);
    compile(state) -> seconds spent compiling (~0 when already compiled);
    trace_count() -> how often this trainer's step has been traced (stays 1 over any number of
    steps).
    """

    init: Callable[..., TrainState]
    step: Callable[[TrainState], tuple[TrainState, dict]]
    compile: Callable[[TrainState], float]
    trace_count: Callable[[], int]


class Optax(NamedTuple):
    """Any ``optax.GradientTransformation``: one update per epoch (:func:`make_trainer`).

    Its stop rule is ``early_stopping`` when one is given (the loop also ends after its epochs).
    """

    tx: Any
    takes_metric = False

    def trainer(self, X, y, *, backend: Backend, mll_config: MLLConfig = _DEFAULT_MLL,
                warm_start: bool = True) -> Trainer:
        """Return :func:`make_trainer` for this transformation."""
        return make_trainer(X, y, backend=backend, mll_config=mll_config, optimizer=self.tx,
                            warm_start=warm_start)

    def stop_rules(self, early_stopping: EarlyStopping | None) -> list:
        """Return the plateau rule of ``early_stopping``, if any."""
        return [] if early_stopping is None else [Plateau(early_stopping)]


class LBFGS(NamedTuple):
    """L-BFGS on a fixed objective: the settings of :func:`make_lbfgs_trainer`.

    With SLQ the probes are drawn once per run (common random numbers), so the loss is one
    deterministic function whose value and gradient agree, and a quasi-Newton step with a line
    search is sound. The direction is the two-loop product (:func:`gpadjoint.lbfgs.direction`);
    the step length comes from a weak-Wolfe line search (:func:`gpadjoint.lbfgs.weak_wolfe`)
    that starts at 1 and reuses every evaluation (the accepted point's value, gradient and CG
    solution carry over to the next step, so no point is evaluated twice).

    memory_size: curvature pairs kept by L-BFGS.
    max_linesearch_steps: loss evaluations allowed per step before the line search gives up.
    c1: sufficient-decrease (Armijo) constant.
    c2: curvature constant (weak Wolfe); guarantees positive curvature pairs.
    rtol: stop once the loss changes by less than ``rtol * max(1, |loss|)`` per step ...
    patience: ... for this many consecutive steps,
    gtol: or once the gradient's 2-norm (raw parameters, per datum) is at most this,
    ptol: or once the decrease the quadratic model predicts for the next step, 1/2 g^T H^-1 g
        with L-BFGS's inverse Hessian in the metric's coordinates (per datum), is at most this
        for two consecutive steps (0: off). Only with a ``metric``: without one the model's
        inverse Hessian can be far too small early on. Unlike ``rtol`` it does not stop on a
        flat stretch that the model still sees descending.
    refresh: rebuild the preconditioner (held fixed between rebuilds, so that the objective is
        smooth and its gradient exact) once a log hyperparameter has moved more than this since
        it was built; the step then starts from a fresh evaluation.
    max_step: the most any log hyperparameter may move in one step (line-search trial points
        included). Trial points whose CG solve misses ``cg_tol`` are treated as failures.
    metric: None, or a (k, k) matrix M (nested tuples; k = d + 3) under which L-BFGS runs in
        coordinates v with u = M v, u the coordinates of :func:`gpadjoint.coords.to_opt`. Its
        first step is then the Newton step of the Hessian (M M^T)^-1.
        :func:`gpadjoint.start.subset_metric` computes one from the exact Hessian of the
        subset's loss at its optimum: the full-data loss per datum has nearly the same
        curvature, which differs by orders of magnitude between a weak input's lengthscale
        and the noise, and identity-scaled L-BFGS spends its costly full-data evaluations
        learning that. None: identity.
    """

    memory_size: int = 10
    max_linesearch_steps: int = 10
    c1: float = 1e-4
    c2: float = 0.9
    rtol: float = 1e-5
    patience: int = 3
    gtol: float = 1e-5
    ptol: float = 0.0
    refresh: float = 1.0
    max_step: float = 5.0
    metric: Any = None

    takes_metric = True

    def with_metric(self, metric) -> LBFGS:
        """Return these settings in the coordinates of ``metric`` (see the class docstring)."""
        return self._replace(metric=metric)

    def trainer(self, X, y, *, backend: Backend, mll_config: MLLConfig = _DEFAULT_MLL,
                warm_start: bool = True) -> Trainer:
        """Return :func:`make_lbfgs_trainer` with these settings."""
        return make_lbfgs_trainer(X, y, backend=backend, mll_config=mll_config, lbfgs=self,
                                  warm_start=warm_start)

    def stop_rules(self, early_stopping: EarlyStopping | None) -> list:
        """L-BFGS's own convergence rule (``early_stopping`` does not apply to it)."""
        rules = [Converged(self.rtol, self.gtol, self.patience)]
        return rules + ([PredictedDecrease(self.ptol, 2)] if self.ptol > 0 else [])


class LBFGSState(NamedTuple):
    """Optimiser state of the L-BFGS trainer (a pytree, checkpointed as such).

    inner: the curvature memory (:class:`gpadjoint.lbfgs.Memory`, in the metric's coordinates).
    value: loss at the current parameters (NaN until first evaluated).
    grad: its gradient (raw parameters).
    anchor: the parameters the preconditioner is built at (see :class:`LBFGS`).
    metric: the (k, k) coordinate matrix M of :class:`LBFGS` (identity when none was given);
        kept in the state so that a resumed run continues in the same coordinates.
    depth: the Lanczos depth of the objective now (``MLLConfig.depth_tol`` deepens it).
    depth_change: the ``depth_change`` of ``neg_mll`` at the current parameters (NaN until
        first evaluated): above ``depth_tol`` the next step deepens before it moves.
    """

    inner: Any
    value: jax.Array
    grad: Params
    anchor: Params
    metric: jax.Array
    depth: jax.Array
    depth_change: jax.Array


def as_optimizer(optimizer):
    """Turn what :func:`gpadjoint.train.fit` accepts into an optimiser of the protocol.

    None: ``Optax(optax.adam(0.05))``; an ``optax.GradientTransformation``: wrapped in
    :class:`Optax`; an :class:`Optax` or :class:`LBFGS` (anything with ``trainer`` and
    ``stop_rules``): itself.
    """
    if optimizer is None:
        return Optax(optax.adam(0.05))
    if hasattr(optimizer, "trainer") and hasattr(optimizer, "stop_rules"):
        return optimizer
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return Optax(optimizer)
    raise TypeError(
        f"optimizer must be an optax.GradientTransformation, gpadjoint.optimizers.Optax(tx) or "
        f"gpadjoint.optimizers.LBFGS(...), got {type(optimizer).__name__}")


# --------------------------------------------------------------------------------------------
# The optax trainer


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
        params = _check_params(params, X)
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

    def step(state: TrainState, stop: Callable[[], bool] | None = None):
        return executable(state)(state, X, y)  # one evaluation: nothing to abandon

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


# --------------------------------------------------------------------------------------------
# The L-BFGS trainer


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

    One step is one L-BFGS iteration: the two-loop direction, then a weak-Wolfe line search of
    at most ``lbfgs.max_linesearch_steps`` evaluations of ``value_and_grad(neg_mll)``, each
    compiled once and warm-started (CG) from the previous evaluation's solution. All
    evaluations use the probes of ``fold_in(key, 0)``: value and gradient belong to one
    deterministic objective over the whole run.

    ``metrics`` of a step, besides those of :func:`make_trainer`'s step: ``evaluations`` (loss
    evaluations this step, line search included), ``refreshed`` (the preconditioner was rebuilt
    at this step's start, so ``loss`` is a new evaluation), ``step_size``, ``new_loss`` and
    ``new_grad_norm`` (at the accepted point), ``linesearch_ok`` (False when no evaluation
    decreased the loss: the state is returned unchanged and the run should stop),
    ``interrupted`` (``stop()`` returned True before an evaluation: the step was abandoned and
    the state is returned as it came in -- memory, value, gradient, anchor and CG warm start
    of the last accepted step -- so a run resumed from it makes this step again, identically).
    """
    lbfgs = LBFGS() if lbfgs is None else lbfgs
    ev = _Evaluator(jnp.asarray(X), jnp.asarray(y), backend, mll_config)
    X = ev.X
    dtype = X.dtype
    # only a preconditioner built at an anchor needs rebuilding (not the exact estimator's)
    anchored = mll_config.estimator == "slq" and mll_config.precond_rank > 0

    def init(params: Params, key) -> TrainState:
        params = _check_params(params, X)
        k = X.shape[1] + 3
        metric = np.eye(k) if lbfgs.metric is None else np.asarray(lbfgs.metric, np.float64)
        if metric.shape != (k, k) or not np.all(np.isfinite(metric)):
            raise ValueError(
                f"LBFGS.metric must be a finite ({k}, {k}) matrix for d = {X.shape[1]} inputs "
                f"(log lengthscales, log output scale, log noise, mean), got shape {metric.shape}"
            )
        opt_state = LBFGSState(
            inner=host.init_memory(k, lbfgs.memory_size),
            value=jnp.asarray(jnp.nan, dtype),
            grad=jax.tree.map(jnp.zeros_like, params),
            anchor=params,
            metric=jnp.asarray(metric),
            depth=jnp.asarray(ev.depth, jnp.int32),
            depth_change=jnp.asarray(jnp.nan, dtype),
        )
        return TrainState(params, opt_state, jnp.asarray(0, jnp.int32), key,
                          jnp.zeros(X.shape[0], dtype) if warm_start else None)

    def compile(state: TrainState) -> float:
        t0 = time.perf_counter()
        ev.set_depth(int(state.opt_state.depth))
        ev.executable(state.params, jax.random.fold_in(state.key, 0), state.last_alpha,
                      state.opt_state.anchor)
        return time.perf_counter() - t0

    def step(state: TrainState, stop: Callable[[], bool] | None = None):
        return _lbfgs_step(state, ev, lbfgs, anchored, stop)

    return Trainer(init, step, compile, lambda: ev.traces)


class _Evaluator:
    """value_and_grad of ``neg_mll`` on one data set, compiled once per input signature.

    ``run`` evaluates on the host and adds up the counts of one L-BFGS step (``start`` resets
    them); the CG warm start advances only past solved, finite evaluations.
    """

    def __init__(self, X, y, backend, cfg: MLLConfig):
        self.X, self.y, self.backend, self.cfg = X, y, backend, cfg
        self.traces = 0
        self.compiled: dict = {}
        self.counts: dict = {}
        self.last_change = math.nan
        n = X.shape[0]
        self.depth = min(cfg.lanczos_depth, n)
        # deepening applies to SLQ only, up to max_lanczos_depth (and n)
        slq = cfg.estimator == "slq"  # resolved by the plan (gpadjoint.plan)
        self.max_depth = min(max(cfg.max_lanczos_depth, self.depth), n) if slq else self.depth
        # the preconditioner of an anchor, built once and reused by every evaluation there
        self.anchored = slq and cfg.precond_rank > 0
        self._factors: tuple | None = None  # (anchor's bytes, its PrecondFactors)
        self._build = _factors_builder(backend.kernel, cfg)
        # CG iterations of the last evaluation, and of the last accepted point (trial_cap)
        self.last_its: int = 0
        self.accepted_its: int | None = None

    def set_depth(self, depth: int) -> None:
        """Evaluate with this Lanczos depth from now on (compiled once per depth)."""
        self.depth = int(depth)
        self.cfg = dataclasses.replace(self.cfg, lanczos_depth=self.depth)

    def too_shallow(self, change: float) -> bool:
        """Whether ``depth_change`` calls for a deeper Lanczos iteration that is allowed."""
        tol = self.cfg.depth_tol
        return tol > 0 and self.depth < self.max_depth and not change <= tol

    def factors(self, anchor: Params):
        """Return the :class:`~gpadjoint.mll.PrecondFactors` at ``anchor`` (the last one cached)."""
        tag = _anchor_tag(anchor)
        if self._factors is None or self._factors[0] != tag:
            self._factors = None  # free the old factors before the new ones are built
            if _HANDOFF:  # built before the fit at this anchor: take it
                given = _HANDOFF.pop(_factors_key(self.X, self.backend.kernel, self.cfg,
                                                  anchor), None)
                _HANDOFF.clear()
                if given is not None:
                    self._factors = (tag, given)
                    return given
            h0 = constrain(anchor, self.cfg.noise_floor)
            t0 = time.perf_counter()
            self._factors = (tag, jax.block_until_ready(self._build(self.X, h0)))
            self.counts["precond_builds"] = self.counts.get("precond_builds", 0) + 1
            seconds = time.perf_counter() - t0
            logger.debug("preconditioner built (rank %d, n = %d) in %.1f s",
                         self.cfg.precond_rank, self.X.shape[0], seconds,
                         extra={"evaluation": {"kind": "precond", "n": int(self.X.shape[0]),
                                               "rank": int(self.cfg.precond_rank),
                                               "seconds": seconds}})
        return self._factors[1]

    def _evaluate(self, params, key, x0, anchor, cap, X, y):
        self.traces += 1  # runs only while tracing
        # anchored: ``anchor`` is the PrecondFactors built there (see ``executable``)
        pre = dict(precond=anchor) if self.anchored else dict(precond_params=anchor)
        if self.cfg.estimator == "slq":
            pre["cg_cap"] = cap

        def loss(p):
            return neg_mll(p, X, y, key, backend=self.backend, config=self.cfg, x0=x0, **pre)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        keep = ("cg_iterations", "cg_residual", "passes", "alpha", "depth_change")
        return value, grads, {k: aux[k] for k in keep}

    def executable(self, params, key, x0, anchor, cap=None):
        if self.anchored:
            anchor = self.factors(anchor)
        cap = jnp.asarray(self.cfg.cg_max_iter if cap is None else cap, self.X.dtype)
        args = (params, key, x0, anchor, cap, self.X, self.y)
        sig = (_signature(args), self.depth)
        if sig not in self.compiled:
            self.compiled[sig] = jax.jit(self._evaluate).lower(*args).compile()
        return self.compiled[sig], args

    def start(self):
        self.counts = {"evaluations": 0, "cg_iterations": 0, "passes": 0, "cg_residual": 0.0,
                       "precond_builds": 0, "cg_capped": 0}

    def trial_cap(self) -> int | None:
        """Return the CG bound of a line search's trial point.

        :data:`TRIAL_CG_FACTOR` times the accepted point's iterations plus
        :data:`TRIAL_CG_SLACK`; None (no bound) before any point was accepted in this
        process, e.g. right after a resume.
        """
        if self.accepted_its is None:
            return None
        return min(TRIAL_CG_FACTOR * self.accepted_its + TRIAL_CG_SLACK, self.cfg.cg_max_iter)

    def run(self, p, key, x0, anchor, cap: int | None = None):
        """-> (value, grad, finite, solved, x0 for the next evaluation), all on the host.

        ``cap``: at most this many CG iterations (None: ``cg_max_iter``); a solve it stops
        is unsolved and counted in ``cg_capped``.
        """
        t0 = time.perf_counter()
        exe, args = self.executable(p, key, x0, anchor, cap)
        t1 = time.perf_counter()
        v, g, aux = jax.device_get(exe(*args))
        self._log(float(v), aux, t1 - t0, time.perf_counter() - t1)
        c = self.counts
        c["evaluations"] += 1
        c["cg_iterations"] += int(aux["cg_iterations"])
        c["passes"] += int(aux["passes"])
        self.last_change = float(aux["depth_change"])
        finite = bool(np.isfinite(v)) and coords.tree_finite(g)
        solved = float(aux["cg_residual"]) <= self.cfg.cg_tol
        self.last_its = int(aux["cg_iterations"])
        if cap is not None and not solved and self.last_its >= cap:
            c["cg_capped"] += 1  # a discarded trial, stopped on purpose: not a failed solve
        else:
            c["cg_residual"] = max(c["cg_residual"], float(aux["cg_residual"]))
        alpha = aux["alpha"]
        if x0 is not None and finite and solved and np.all(np.isfinite(alpha)):
            x0 = jnp.asarray(alpha, self.X.dtype)
        return float(v), g, finite, solved, x0


    def _log(self, value: float, aux: dict, prepare: float, seconds: float) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        rec = {"kind": "evaluation", "n": int(self.X.shape[0]), "estimator": self.cfg.estimator,
               "loss": value, "cg_iterations": int(aux["cg_iterations"]),
               "cg_residual": float(aux["cg_residual"]), "passes": int(aux["passes"]),
               "depth": self.depth, "seconds": seconds, "prepare_seconds": prepare}
        logger.debug("evaluation %d (n = %d, %s): loss %.8g, %d CG iterations (residual %.1e), "
                     "%d passes, Lanczos depth %d, %.1f s (+%.1f s compile/preconditioner)",
                     self.counts.get("evaluations", 0) + 1, rec["n"], rec["estimator"], value,
                     rec["cg_iterations"], rec["cg_residual"], rec["passes"], self.depth,
                     seconds, prepare, extra={"evaluation": rec})


def _lbfgs_step(state: TrainState, ev: _Evaluator, lbfgs: LBFGS, anchored: bool,
                stop: Callable[[], bool] | None = None):
    """One L-BFGS iteration of :func:`make_lbfgs_trainer` (host code around compiled calls).

    ``stop()`` is asked before every evaluation: a True answer abandons the
    step and returns ``state`` itself (nothing of the step is kept, not even a point of the
    line search with sufficient decrease, so the state is that of the last accepted step).
    """
    key = jax.random.fold_in(state.key, 0)  # the same probes at every evaluation
    s, cfg, dtype = state.opt_state, ev.cfg, ev.X.dtype
    params, x0, anchor = state.params, state.last_alpha, s.anchor
    ev.start()
    ev.set_depth(int(s.depth))
    value, grad, change = float(s.value), s.grad, float(s.depth_change)
    refreshed = (anchored and coords.moved(params, anchor) > lbfgs.refresh
                 and bool(np.isfinite(value)))
    if refreshed:  # the preconditioner is stale: rebuild it here
        anchor, value = params, math.nan
    ev.counts["refreshed"] = refreshed
    deepened = False
    while True:
        if np.isfinite(value) and ev.too_shallow(change):
            # the quadrature has not converged here: a deeper one is a new objective
            ev.set_depth(min(2 * ev.depth, ev.max_depth))
            value, deepened = math.nan, True
        if np.isfinite(value):
            break
        if stop is not None and stop():
            return state, _abandoned(state, ev, cfg)
        value, grad, finite, solved, x0 = ev.run(params, key, x0, anchor)  # first step, new P
        change = ev.last_change
        ev.accepted_its = ev.last_its if solved else None
        if not finite:
            break
    ev.counts.update(deepened=deepened, lanczos_depth=ev.depth, depth_change=change)
    finite = bool(np.isfinite(value))
    gnorm = coords.tree_norm(grad)
    metrics = _lbfgs_metrics(state.params, value, gnorm, cfg, finite)
    failed = dict(linesearch_ok=False, step_size=0.0, new_loss=value, new_grad_norm=gnorm)
    if not finite:
        metrics.update(ev.counts, **failed)
        return state, metrics

    M = np.asarray(jax.device_get(s.metric), np.float64)
    u = coords.to_opt(params)
    gu = coords.opt_grad(grad, params)
    desc, slope, inner = _descent(u, gu, s.inner, M)
    x0_box, search = _search(ev, lbfgs, u, desc, value, slope, key, x0, anchor, dtype, stop)
    if search.interrupted:  # the state of the last accepted step, as it came in
        return state, _abandoned(state, ev, cfg)
    x0 = x0_box[0]
    if search.trial is None:
        metrics.update(ev.counts, **failed)
        kept = LBFGSState(s.inner, jnp.asarray(value, dtype), grad, anchor, s.metric,
                           jnp.asarray(ev.depth, jnp.int32), jnp.asarray(change, dtype))
        return TrainState(state.params, kept, state.epoch, state.key, x0), metrics
    t, (p_new, g_new, change_new, its_new) = search.t, search.trial.payload
    ev.accepted_its = its_new  # the next step's trials are bounded by it
    if not (search.wolfe or t * (search.trial.slope - slope) > 0):
        # no positive curvature pair: forget
        inner = host.init_memory(M.shape[0], lbfgs.memory_size)
    new_grad = Params(*(jnp.asarray(a, dtype) for a in g_new))
    new_state = TrainState(
        params=Params(*(jnp.asarray(a, dtype) for a in p_new)),
        opt_state=LBFGSState(inner, jnp.asarray(search.trial.value, dtype), new_grad, anchor,
                             s.metric, jnp.asarray(ev.depth, jnp.int32),
                             jnp.asarray(change_new, dtype)),
        epoch=state.epoch + 1, key=state.key, last_alpha=x0)
    metrics.update(ev.counts, linesearch_ok=True, step_size=t, new_loss=search.trial.value,
                   new_grad_norm=coords.tree_norm(g_new),
                   **_predicted(p_new, g_new, inner, M))
    return new_state, metrics


def _search(ev: _Evaluator, lbfgs: LBFGS, u: Params, desc: Params, value: float, slope: float,
            key, x0, anchor, dtype, stop):
    """Run the weak-Wolfe search along ``desc`` -> ``(x0_box, search)`` (see :func:`_line`).

    Trial points run CG to :meth:`_Evaluator.trial_cap`; a search that found no point under
    that bound (even its shortest steps needed more) runs once more without it, as it would
    have before there was one.
    """
    caps = Params(coords.INV_LS_STEP, lbfgs.max_step, lbfgs.max_step, lbfgs.max_step)

    def search_line(bounded: bool):
        phi, box = _line(ev, u, desc, key, x0, anchor, dtype, bounded=bounded)
        return box, host.weak_wolfe(phi, value, slope, t_max=host.step_cap(desc, caps),
                                    c1=lbfgs.c1, c2=lbfgs.c2,
                                    max_evals=lbfgs.max_linesearch_steps, stop=stop)

    x0_box, search = search_line(bounded=True)
    if search.trial is None and not search.interrupted and ev.counts["cg_capped"]:
        x0_box, search = search_line(bounded=False)
    return x0_box, search


def _line(ev: _Evaluator, u: Params, desc: Params, key, x0, anchor, dtype, bounded=True):
    """``(phi, x0_box)``: the line search's function of the step t along ``desc`` from ``u``.

    ``bounded``: each trial's CG stops at :meth:`_Evaluator.trial_cap`.

    ``phi(t)`` evaluates the loss at ``u + t desc`` (trainer coordinates, :func:`coords.to_opt`)
    in the working ``dtype`` and returns a :class:`gpadjoint.lbfgs.Trial` whose payload is (params,
    gradient, depth change); ``x0_box[0]`` holds the CG warm start, updated by each evaluation.
    """
    x0_box = [x0]

    def phi(t):
        u_t = Params(*(a + t * b for a, b in zip(u, desc)))
        p_t = Params(*(np.asarray(a, dtype) for a in coords.from_opt(u_t)))  # working dtype
        v_t, g_t, fin_t, solved_t, x0_box[0] = ev.run(
            p_t, key, x0_box[0], anchor, cap=ev.trial_cap() if bounded else None)
        # an unconverged CG solve gives an inexact value: such a point is not taken (and one
        # that needs many times the accepted point's iterations is stopped early: a shorter
        # step is tried instead)
        if not (fin_t and solved_t):
            return host.Trial(False, v_t, math.nan)
        gu_t = coords.opt_grad(g_t, p_t)
        # from_opt reads an inverse lengthscale as |u| (the loss is even in it): past 0, along
        # the line, its derivative changes sign (a weak input's 1/l steps through 0 often)
        sign = np.where(np.asarray(u_t.raw_lengthscale) < 0, -1.0, 1.0)
        gu_t = gu_t._replace(raw_lengthscale=np.asarray(gu_t.raw_lengthscale) * sign)
        return host.Trial(True, v_t, coords.tree_vdot(gu_t, desc),
                          (p_t, g_t, ev.last_change, ev.last_its))

    return phi, x0_box


def _predicted(p: Params, g: Params, memory, M: np.ndarray) -> dict:
    """``predicted_decrease`` for the step's record, only in a Hessian metric (M not I).

    In raw coordinates the memory's inverse Hessian starts far too small (yacht, exact loss, no
    subset start: a stop on it ended 0.33 nats/datum short). The metric is part of the state,
    so a resumed run decides the same way.
    """
    if np.array_equal(M, np.eye(M.shape[0])):
        return {}
    return {"predicted_decrease": _predicted_decrease(p, g, memory, M)}


def _predicted_decrease(p: Params, g: Params, memory, M: np.ndarray) -> float:
    """1/2 g_v^T H_v^-1 g_v at ``p``: the decrease the L-BFGS model expects from a full step.

    The next step's own two-loop product (the memory gains the pair of the step just taken),
    computed here and discarded; the next step recomputes the same product.
    """
    u = coords.to_opt(p)
    v, gv = np.linalg.solve(M, coords.flat(u)), M.T @ coords.flat(coords.opt_grad(g, p))
    hg, _ = host.direction(gv, memory, v)
    return 0.5 * float(gv @ hg)


def _abandoned(state: TrainState, ev: _Evaluator, cfg: MLLConfig) -> dict:
    """Metrics of a step abandoned on ``stop()``: those of its state, and ``interrupted``."""
    value, grad = float(state.opt_state.value), state.opt_state.grad
    gnorm = coords.tree_norm(grad)
    metrics = _lbfgs_metrics(state.params, value, gnorm, cfg, True)
    metrics.update(ev.counts, interrupted=True, linesearch_ok=True, step_size=0.0,
                   new_loss=value, new_grad_norm=gnorm)
    return metrics


def _descent(u: Params, gu: Params, memory, M: np.ndarray):
    """(direction in u, slope along it, memory): L-BFGS in coordinates v with u = M v.

    The gradient there is M^T g_u and a direction d_v maps back to M d_v. A direction that is
    not downhill (round-off in the memory) restarts from the scaled gradient.
    """
    v, gv = np.linalg.solve(M, coords.flat(u)), M.T @ coords.flat(gu)
    hg, memory = host.direction(gv, memory, v)
    desc = coords.unflat(M @ -hg, u)
    slope = coords.tree_vdot(gu, desc)
    if not (np.isfinite(slope) and slope < 0):  # lost descent: restart from the gradient
        memory = host.init_memory(M.shape[0], len(memory.weights_memory))
        scale = min(1.0, 1.0 / max(float(np.linalg.norm(gv)), 1e-30))
        desc = coords.unflat(M @ (-scale * gv), u)
        slope = coords.tree_vdot(gu, desc)
    return desc, slope, memory


_constrain_jit = jax.jit(constrain, static_argnums=1)


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


def _check_params(params: Params, X) -> Params:
    params = Params(*(jnp.asarray(p, X.dtype) for p in params))
    if params.raw_lengthscale.shape != (X.shape[1],):
        raise ValueError(
            f"params.raw_lengthscale has shape {params.raw_lengthscale.shape}, "
            f"expected ({X.shape[1]},) for d = {X.shape[1]} inputs"
        )
    return params


# --------------------------------------------------------------------------------------------
# The [optim] factory


def resolve_optimizer(name: str, estimator: str) -> tuple[str, str]:
    """Resolve ``optimizer = "auto"``: L-BFGS with a line search for either estimator.

    The exact loss is deterministic; the SLQ loss is made so by drawing its probes once per run
    (:class:`LBFGS`), so its value and gradient agree and a line search is sound.
    """
    if name != "auto":
        return name, "requested"
    if estimator == "exact":
        return "lbfgs", "auto: the exact loss is deterministic, so L-BFGS with a line search"
    return "lbfgs", (
        "auto: SLQ with its probes fixed for the run is a deterministic objective whose exact "
        "gradient the adjoint gives, so L-BFGS with a line search (it fits to the optimum; Adam "
        "stops wherever its epochs end)"
    )


def make_optimizer(cfg: OptimConfig, epochs: int | None = None, estimator: str = "slq"):
    """Build the optimiser described by ``cfg`` (one step = one epoch).

    ``optimizer = "auto"`` is resolved by :func:`resolve_optimizer` for the given (resolved)
    estimator. ``lbfgs`` is :class:`LBFGS` for either estimator (probes fixed for the run with
    SLQ, CG warm-started from the previous evaluation, every evaluation reused; stop rule
    ``lbfgs_rtol`` / ``lbfgs_gtol``); it ignores ``lr`` and the schedule (the line search sets
    the step) and refuses ``clip_norm``. The others are ``optax.GradientTransformation``
    objects (:func:`as_optimizer` wraps them in :class:`Optax`).

    Schedules: ``constant`` (lr); ``cosine`` from lr to ``lr * final_lr_fraction`` over
    ``decay_epochs`` (0 = ``epochs``, which must then be given); ``exponential`` lr *
    decay_rate**epoch. ``warmup_epochs`` > 0 prepends a linear warm-up from 0.
    ``clip_norm`` > 0 clips the gradient's global norm first.
    """
    name, _ = resolve_optimizer(cfg.optimizer, estimator)
    if name == "lbfgs":
        if cfg.clip_norm > 0:
            raise ValueError("[optim] clip_norm does not apply to lbfgs (its line search sets "
                             "the step); set clip_norm = 0")
        return LBFGS(memory_size=cfg.lbfgs_memory, rtol=cfg.lbfgs_rtol, gtol=cfg.lbfgs_gtol,
                     ptol=cfg.lbfgs_ptol)
    opt = _gradient_method(name, cfg, _schedule(cfg, epochs))
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt


def _schedule(cfg: OptimConfig, epochs: int | None):
    if cfg.schedule == "constant":
        sched = cfg.lr
    elif cfg.schedule == "cosine":
        steps = cfg.decay_epochs or epochs
        if not steps:
            raise ValueError(
                "[optim] schedule = 'cosine' needs decay_epochs > 0 or the number of epochs"
            )
        sched = optax.cosine_decay_schedule(cfg.lr, steps, alpha=cfg.final_lr_fraction)
    else:
        sched = optax.exponential_decay(cfg.lr, transition_steps=1, decay_rate=cfg.decay_rate)
    if cfg.warmup_epochs > 0:
        after = sched if callable(sched) else optax.constant_schedule(sched)
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_epochs), after], [cfg.warmup_epochs]
        )
    return sched


def _gradient_method(name: str, cfg: OptimConfig, sched):
    if name == "adam":
        return optax.adam(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if name == "adamw":
        return optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)
    return optax.sgd(sched, momentum=cfg.momentum or None)
