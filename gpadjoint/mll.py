r"""The negative log-marginal likelihood per datum, by SLQ + preconditioned CG.

Data flow: logdet / solve -> **mll** -> optimizers -> train.

    neg_mll(theta) = -log p(y | theta) / n
                   = [ (y - mu)^T K^{-1} (y - mu) + log det K + n log(2 pi) ] / (2 n)

with K = s2 k(X/l, X/l) + sigma2 I, log det K from stochastic Lanczos quadrature
(:mod:`gpadjoint.logdet`, gradient by the Lanczos adjoint) and the quadratic term from CG
preconditioned by a rank-r pivoted Cholesky (:mod:`gpadjoint.solve`, implicit gradient).
One call gives a value whose gradient (``jax.value_and_grad``) is the exact gradient of *this*
estimator: the probes are drawn from the key passed in, so value and gradient share them.

:func:`neg_mll_exact` is the dense Cholesky reference (O(n^3)), and the ``"exact"`` estimator
the trainer runs under jit at n <= ``exact_max_n``: one JAX Cholesky of the whole K with a
closed-form VJP. Its formula is :func:`gpadjoint.exact.neg_mll_from_terms`, and it is tested equal
to the blocked float64 path of :mod:`gpadjoint.exact` (value and gradient), which serves every
size outside the trainer (evaluation, prediction, the reference fit).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .exact import neg_mll_from_terms
from .fused import slq_and_solve
from .kernels import NOISE_FLOOR, Params, constrain, cross_cov, dense_cov
from .logdet import half_inverse_factors, rademacher, slq_from_tridiag, slq_terms
from .matvec import Backend
from .settings import ESTIMATORS, EXACT_MAX_N, MLLConfig  # noqa: F401 (re-exported)
from .solve import Preconditioner, make_preconditioner, pivoted_cholesky

DEFAULT_MLL_CONFIG = MLLConfig()


def choose_estimator(n: int, config: MLLConfig) -> tuple[str, str]:
    """Resolve ``config.estimator`` for n data points; return (name, reason)."""
    if config.estimator != "auto":
        return config.estimator, "requested"
    if n <= config.exact_max_n:
        return "exact", (
            f"auto: n = {n} <= exact_max_n = {config.exact_max_n}, so float64 Cholesky "
            "(exact and deterministic) is affordable"
        )
    return "slq", f"auto: n = {n} > exact_max_n = {config.exact_max_n}"


def neg_mll(
    params: Params,
    X: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    backend: Backend,
    config: MLLConfig = DEFAULT_MLL_CONFIG,
    probes: jax.Array | None = None,
    x0: jax.Array | None = None,
    precond_params: Params | None = None,
    precond: PrecondFactors | None = None,
    cg_cap: jax.Array | None = None,
):
    """-log p(y | theta) / n (per datum, 2 pi constant included), estimated by SLQ + PCG.

    Args:
        params: unconstrained :class:`~gpadjoint.kernels.Params` (dtype of X).
        X: (n, d) inputs.
        y: (n,) targets.
        key: PRNG key for the probes (fixed within one evaluation).
        backend: matvec engine (:func:`gpadjoint.matvec.make_backend`).
        config: :class:`MLLConfig`.
        probes: optional explicit (n, p) probe block replacing the Rademacher draw; the
            estimator is (1/p) sum_i |z_i|^2 e_1^T log(T_i) e_1, so sqrt(n) times the n unit
            vectors with depth n gives log det K exactly.
        x0: optional warm start for CG (e.g. the previous step's solution).
        precond_params: build the preconditioner P (the CG preconditioner, and the log-det
            split with ``precond_logdet``) at these parameters instead of ``params``. P never
            receives a gradient; held fixed over several evaluations it makes the estimate a
            smooth function of ``params`` whose gradient is exactly the one computed (rebuilt
            at every ``params``, its pivots and values move with ``params`` but no gradient
            says so).
        precond: the factors :func:`precond_factors` built (at ``precond_params``), used as
            they are instead of being rebuilt here: the L-BFGS trainer builds them once per
            anchor, not once per evaluation (at rank 1000 they cost more than the rest of an
            evaluation).
        cg_cap: optional traced bound on this evaluation's CG iterations below
            ``config.cg_max_iter`` (:func:`gpadjoint.fused.slq_and_solve`); a solve stopped by
            it reports its residual like any unconverged one.

    Returns:
        (value, aux) with aux a dict of diagnostics: ``logdet``, ``quad`` (y^T K^-1 y),
        ``cg_iterations``, ``cg_residual`` (relative), ``alpha`` (K^-1 (y - mu), no gradient),
        ``passes`` (passes over the n^2 kernel pairs this value and its gradient cost; 0 for the
        exact estimator).

    """
    if config.estimator == "auto":
        raise ValueError(
            "neg_mll needs a resolved estimator, got MLLConfig(estimator='auto'); resolve it "
            "once per fit with gpadjoint.plan.resolve_estimator(n, config) (GPRegressor and "
            "gpadjoint.train.fit do) and pass the result"
        )
    if config.estimator == "exact":
        return _neg_mll_exact_aux(
            params, X, y, kernel=backend.kernel, noise_floor=config.noise_floor
        )
    hypers = constrain(params, config.noise_floor)
    if probes is None:
        probes = rademacher(key, X.shape[0], config.num_probes, X.dtype)
    h0 = hypers if precond_params is None else constrain(precond_params, config.noise_floor)
    if precond is None:
        precond = precond_factors(X, backend.kernel, h0, config)
    return _neg_mll_slq(hypers, params.mean, X, y, probes, x0, precond, backend=backend,
                        config=config, cg_cap=cg_cap)


class PrecondFactors(NamedTuple):
    """The preconditioner P = L L^T + noise0 I built at one set of parameters, with no gradient.

    ``precond``: the CG preconditioner (None at rank 0); ``half``, ``logdet_P``, ``lower``: the
    log-det split's factors of P^{-1/2}, log det P and the Ritz-value clamp for K >= noise0 I
    (None, 0 and None without ``precond_logdet``); ``noise``: noise0.
    """

    precond: Preconditioner | None
    half: tuple | None
    logdet_P: jax.Array
    lower: jax.Array | None
    noise: jax.Array


def precond_factors(X, kernel: str, h0, config: MLLConfig) -> PrecondFactors:
    """Build :class:`PrecondFactors` at constrained parameters ``h0`` (rank ``precond_rank``)."""
    h0 = jax.tree.map(lax.stop_gradient, h0)
    n = X.shape[0]
    precond = half = lower = None
    logdet_P = jnp.zeros((), X.dtype)
    if config.precond_rank > 0:
        L = pivoted_cholesky(
            lambda i: cross_cov(kernel, lax.dynamic_slice_in_dim(X, i, 1), X, h0)[0],
            jnp.full((n,), h0.outputscale, X.dtype),
            min(config.precond_rank, n),
            # random pivots from one fixed key: P is a deterministic function of h0 and X
            key=jax.random.PRNGKey(0) if config.precond_pivot == "random" else None,
        )
        precond = make_preconditioner(L, h0.noise)
        if config.precond_logdet:
            half, logdet_P, lower = half_inverse_factors(L, h0.noise, X.dtype)
    return PrecondFactors(precond, half, logdet_P, lower, h0.noise)


def _neg_mll_slq(hypers, mean, X, y, probes, x0, factors: PrecondFactors, *, backend: Backend,
                 config: MLLConfig, cg_cap=None):
    """Estimate :func:`neg_mll` by SLQ + PCG at constrained ``hypers``; -> (value, aux).

    ``factors``: the preconditioner, built elsewhere (no gradient flows through it).
    """
    n = X.shape[0]
    mv, args = backend.operator(X, hypers)
    depth = min(config.lanczos_depth, n)
    h_cur = jax.tree.map(lax.stop_gradient, hypers)
    precond, half, logdet_P, lower = _preconditioner(h_cur, factors)
    # One pass per step serves every probe's Lanczos process and the CG solve (gpadjoint.fused).
    tri, quad, alpha, info, passes = slq_and_solve(
        mv,
        probes,
        y - mean,
        *args,
        depth=depth,
        precond=precond,
        tol=config.cg_tol,
        min_iter=config.cg_min_iter,
        max_iter=config.cg_max_iter,
        x0=x0,
        half=half,
        cg_cap=cg_cap,
    )
    slq, change = _slq_and_depth_change(tri, lower, n)
    logdet = logdet_P + slq
    value = neg_mll_from_terms(quad, logdet, n)
    aux = {
        "depth_change": change,
        "logdet": lax.stop_gradient(logdet),
        "quad": lax.stop_gradient(quad),
        "cg_iterations": info.iterations,
        "cg_residual": info.residual[0],
        "alpha": alpha,
        # passes over the n^2 kernel pairs for value + gradient: the shared forward passes, the
        # adjoint's depth passes and the one fused parameter VJP (+ building K, dense backend)
        "passes": passes + depth + 1 + (1 if backend.name == "dense" else 0),
    }
    return value, aux


def _preconditioner(h_cur, f: PrecondFactors):
    """Return (precond, half, logdet_P, lower) of ``f`` for the current parameters ``h_cur``.

    ``lower`` is the lower bound on K's Ritz values the quadrature clamps at: with the log-det
    split the bound of P's factors, scaled when the noise is now below P's (K >= noise I);
    without it half the noise (round-off, in float32, can push Ritz values below it).
    """
    if f.half is None:
        return f.precond, None, f.logdet_P, 0.5 * h_cur.noise
    return f.precond, f.half, f.logdet_P, f.lower * jnp.minimum(1.0, h_cur.noise / f.noise)


def _slq_and_depth_change(tri, lower, n: int):
    """(SLQ log det, ``depth_change``) from the tridiagonals of depth k.

    ``depth_change``: how far the quadrature still moved over the second half of the Lanczos
    steps, per datum: 0.5 |Q_k - Q_{k/2}| / n (the loss's units) between the quadratures of the
    full depth k and of the leading k/2 steps of the same tridiagonals. Gauss quadrature of log
    converges geometrically in the depth, so the error left at depth k is far below this
    change, while an unconverged quadrature overestimates log det by an amount that grows as
    the noise (the spectrum's lower end) falls: a fit at too small a depth drifts to too much
    noise. The L-BFGS trainer deepens the Lanczos iteration while this exceeds
    ``MLLConfig.depth_tol``.

    Both quadratures come from one batched eigendecomposition: the leading k/2 steps are the
    same tridiagonals with a breakdown declared after step k/2 (the rest decouples as the
    identity, log 1 = 0). A second eigendecomposition in the value-and-gradient program made
    the full-depth backward pass of unit probes run without end (n = 70 every time).
    """
    k = tri.alpha.shape[1]
    if k < 2:
        return slq_from_tridiag(tri, lower), jnp.asarray(jnp.inf, tri.alpha.dtype)
    p = tri.alpha.shape[0]
    h = jax.tree.map(lax.stop_gradient, tri)
    cut = jnp.where(jnp.arange(k) >= k // 2 - 1, 0.0, h.beta)  # "breakdown" after k/2 steps
    both = tri._replace(alpha=jnp.concatenate([tri.alpha, h.alpha]),
                        beta=jnp.concatenate([tri.beta, cut]),
                        norm=jnp.concatenate([tri.norm, h.norm]))
    terms = slq_terms(both, lower)
    slq, short = jnp.mean(terms[:p]), jnp.mean(terms[p:])
    return slq, lax.stop_gradient(0.5 * jnp.abs(slq - short) / n)


@jax.custom_vjp
def _chol_terms(K, r):
    """(log det K, r^T K^-1 r, K^-1 r) by Cholesky, with the closed-form VJP of the first two.

    d log det K = tr(K^-1 dK) and d(r^T K^-1 r) = 2 alpha^T dr - alpha^T dK alpha (alpha =
    K^-1 r): one extra O(n^3) inverse instead of differentiating the factorisation itself
    (which costs ~20x the factorisation in JAX on a CPU).
    """
    return _chol_fwd(K, r)[0]


def _chol_fwd(K, r):
    Lc = jnp.linalg.cholesky(K)
    alpha = jax.scipy.linalg.cho_solve((Lc, True), r)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(Lc)))
    # alpha is returned for the caller's diagnostics; its cotangent is ignored (callers stop
    # its gradient).
    return (logdet, jnp.dot(r, alpha), alpha), (Lc, alpha)


def _chol_bwd(res, g):
    Lc, alpha = res
    g_logdet, g_quad, _ = g
    Kinv = jax.scipy.linalg.cho_solve((Lc, True), jnp.eye(Lc.shape[0], dtype=Lc.dtype))
    Kbar = g_logdet * Kinv - g_quad * jnp.outer(alpha, alpha)
    return Kbar, 2.0 * g_quad * alpha


_chol_terms.defvjp(_chol_fwd, _chol_bwd)


def _exact_terms(params: Params, X, y, *, kernel: str, noise_floor: float):
    n = X.shape[0]
    K = dense_cov(kernel, X, constrain(params, noise_floor))
    r = y - params.mean
    logdet, quad, alpha = _chol_terms(K, r)
    value = neg_mll_from_terms(quad, logdet, n)
    return value, logdet, quad, lax.stop_gradient(alpha)


def neg_mll_exact(
    params: Params, X: jax.Array, y: jax.Array, *, kernel: str, noise_floor: float = NOISE_FLOOR
) -> jax.Array:
    """Dense Cholesky reference of -log p(y | theta) / n (O(n^2) memory, O(n^3) time)."""
    return _exact_terms(params, X, y, kernel=kernel, noise_floor=noise_floor)[0]


def _neg_mll_exact_aux(params: Params, X, y, *, kernel: str, noise_floor: float):
    """Evaluate the ``"exact"`` estimator: Cholesky in float64 whatever the working dtype.

    float32 Cholesky fails once the noise nears its floor (cond(K) ~ s2 n / sigma2 > 1e6); at the
    sizes where this estimator is chosen float64 costs little. Value and gradient are returned
    in the working dtype.
    """
    dt = X.dtype
    p64 = Params(*(jnp.asarray(a, jnp.float64) for a in params))
    value, logdet, quad, alpha = _exact_terms(
        p64, X.astype(jnp.float64), y.astype(jnp.float64), kernel=kernel, noise_floor=noise_floor
    )
    aux = {
        "logdet": lax.stop_gradient(logdet).astype(dt),
        "quad": lax.stop_gradient(quad).astype(dt),
        "cg_iterations": jnp.asarray(0, jnp.int32),
        "cg_residual": jnp.asarray(0.0, dt),
        "alpha": alpha.astype(dt),
        "depth_change": jnp.asarray(0.0, dt),  # no quadrature
        "passes": jnp.asarray(0, jnp.int32),
    }
    return value.astype(dt), aux
