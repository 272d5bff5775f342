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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .exact import neg_mll_from_terms
from .fused import slq_and_solve
from .kernels import NOISE_FLOOR, Params, constrain, cross_cov, dense_cov
from .logdet import half_inverse_factors, rademacher, slq_from_tridiag
from .matvec import Backend
from .settings import ESTIMATORS, EXACT_MAX_N, MLLConfig  # noqa: F401 (re-exported)
from .solve import make_preconditioner, pivoted_cholesky

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
            says so). The L-BFGS trainer uses this.

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
    return _neg_mll_slq(hypers, params.mean, X, y, probes, x0, h0, backend=backend,
                        config=config)


def _neg_mll_slq(hypers, mean, X, y, probes, x0, h0, *, backend: Backend, config: MLLConfig):
    """Estimate :func:`neg_mll` by SLQ + PCG at constrained ``hypers``; -> (value, aux).

    ``h0``: the constrained parameters the preconditioner is built at (no gradient flows
    through it).
    """
    n = X.shape[0]
    mv, args = backend.operator(X, hypers)
    depth = min(config.lanczos_depth, n)
    h_cur = jax.tree.map(lax.stop_gradient, hypers)
    precond, half, logdet_P, lower = _preconditioner(
        X, backend.kernel, h_cur, jax.tree.map(lax.stop_gradient, h0), config)
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
    )
    slq = slq_from_tridiag(tri, lower)
    logdet = logdet_P + slq
    value = neg_mll_from_terms(quad, logdet, n)
    aux = {
        "depth_change": _depth_change(tri, lower, slq, n),
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


def _preconditioner(X, kernel: str, h_cur, h0, config: MLLConfig):
    """Return (precond, half, logdet_P, lower): the CG preconditioner built at ``h0``.

    ``half`` and ``logdet_P`` split the log det when ``config.precond_logdet`` (else None and
    0); ``lower`` is the lower bound on K's Ritz values the quadrature clamps at.
    """
    n = X.shape[0]
    precond = L = None
    if config.precond_rank > 0:
        rank = min(config.precond_rank, n)
        L = pivoted_cholesky(
            lambda i: cross_cov(kernel, lax.dynamic_slice_in_dim(X, i, 1), X, h0)[0],
            jnp.full((n,), h0.outputscale, X.dtype),
            rank,
        )
        precond = make_preconditioner(L, h0.noise)
    if config.precond_logdet and L is not None:
        half, logdet_P, lower = half_inverse_factors(L, h0.noise, X.dtype)
        # the bound assumes K >= (P's shift) I; with P from other parameters K >= noise I
        lower = lower * jnp.minimum(1.0, h_cur.noise / h0.noise)
    else:
        # Ritz values of K can never be below sigma2; round-off (float32) can push them there.
        half, logdet_P, lower = None, 0.0, 0.5 * h_cur.noise
    return precond, half, logdet_P, lower


def _depth_change(tri, lower, slq, n: int) -> jax.Array:
    """How far the SLQ log det still moved over the second half of the Lanczos steps, per datum.

    0.5 |Q_k - Q_{k/2}| / n (the loss's units) between the quadratures of the full depth k and of
    the leading k/2 steps of the same tridiagonals. Gauss quadrature of log converges
    geometrically in the depth, so the error left at depth k is far below this change, while
    an unconverged quadrature overestimates log det by an amount that grows as the noise (the
    spectrum's lower end) falls: a fit at too small a depth drifts to too much noise. The
    L-BFGS trainer deepens the Lanczos iteration while this exceeds ``MLLConfig.depth_tol``.
    """
    k = tri.alpha.shape[1]
    if k < 2:
        return jnp.asarray(jnp.inf, tri.alpha.dtype)
    h = k // 2
    # a diagnostic: no gradient flows through it (none is wanted, and differentiating the
    # half-depth quadrature made the full-depth backward pass of unit probes run without end)
    tri, lower, slq = jax.tree.map(lax.stop_gradient, (tri, lower, slq))
    half = tri._replace(alpha=tri.alpha[:, :h], beta=tri.beta[:, :h])
    short = jax.pure_callback(_host_slq, jax.ShapeDtypeStruct((), slq.dtype), half, lower,
                              vmap_method="sequential")
    return 0.5 * jnp.abs(slq - short) / n


def _host_slq(tri, lower):
    """:func:`slq_from_tridiag` in NumPy (for the diagnostic, outside the compiled program)."""
    alpha, beta, norm = (np.asarray(a, np.float64) for a in (tri.alpha, tri.beta, tri.norm))
    k = alpha.shape[1]
    alive = np.cumsum(beta == 0, axis=1)
    alive = np.concatenate([np.zeros_like(alive[:, :1]), alive[:, :-1]], axis=1) == 0
    a = np.where(alive, alpha, 1.0)
    b = np.where(alive[:, 1:], beta[:, :-1], 0.0)
    T = np.zeros((alpha.shape[0], k, k))
    idx = np.arange(k)
    T[:, idx, idx] = a
    T[:, idx[:-1], idx[1:]] = b
    T[:, idx[1:], idx[:-1]] = b
    lam, V = np.linalg.eigh(T)
    lam = np.maximum(lam, float(lower))
    per_probe = np.sum(V[:, 0, :] ** 2 * np.log(lam), axis=1)
    return np.asarray(np.mean(norm ** 2 * per_probe), tri.alpha.dtype)


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
