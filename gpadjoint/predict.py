r"""Posterior prediction of a fitted GP: exact by blocked Cholesky, or CG (exact or LOVE variance).

Data flow: exact / solve -> **predict** -> model. Everything here works in the *internal*
(normalised) units the trainer used; :mod:`gpadjoint.model` maps to and from the user's units.

With K = s2 k(X/l, X/l) + sigma2 I (n x n), k_* = s2 k(X/l, x_*/l) (n,) and mean mu:

    mean(x_*)   = mu + k_*^T alpha,                 alpha = K^{-1} (y - mu)
    var_f(x_*)  = s2 - k_*^T K^{-1} k_*              (latent f; k(x, x) = s2 for every profile)
    var_y(x_*)  = var_f(x_*) + sigma2                (a new noisy observation, the default)

``var_y`` is what scikit-learn's ``GaussianProcessRegressor`` returns when the kernel ends in a
``WhiteKernel``: the spread of a future *measurement*, not of the noise-free function.

Two posteriors (:func:`choose_posterior`, ``[predict] posterior``):

``exact``
    Mean and variance of the exact posterior from one blocked float64 Cholesky factor
    (:mod:`gpadjoint.exact`; one n x n array, O(n^3)): :func:`exact_posterior`. ``auto`` takes it
    whenever that array fits in memory.
``cg``
    Everything below: the mean by one preconditioned CG solve and the variance by one of the
    two engines that follow. For when the factor does not fit.

Solves use conjugate gradients preconditioned by a rank-r pivoted Cholesky
(:mod:`gpadjoint.solve`). The CG tolerance for prediction defaults to :data:`DEFAULT_CG_TOL`
(1e-8 relative residual in float64, 1e-3 in float32). That is much tighter than the training
tolerance (1e-2): training only needs a gradient direction and re-solves every step, but the
posterior mean is read off a single solve, and its error is up to cond(K) times the residual.

Two variance engines:

``exact``
    For each batch of b test points, block CG solves K V = K(X, X_*b) (b right-hand sides, one
    independent recursion each) and var_f = s2 - colsum(K(X, X_*b) o V). O(iters n^2 b) with
    the dense backend: right for n up to a few thousand.
``love``
    LOVE (Pleiss et al., ICML 2018), the idea GPyTorch implements: r Lanczos steps on K started
    from the mean's right-hand side y - mu give K ~= Q T Q^T, so K^{-1} ~= Q T^{-1} Q^T. The
    root R = Q T^{-1/2} (n x r, by eigh of T, Ritz values clamped at sigma2, below which only
    round-off can put them) is computed *once* (the model caches it); then
    var_f ~= s2 - |R^T k_*|^2, O(n r) per test point. Q T^{-1} Q^T is the K-orthogonal
    projection of K^{-1} onto the Krylov space, so (in exact arithmetic) LOVE never subtracts
    more than the exact formula: it over-estimates the variance, never under-estimates it.
    Its accuracy depends on how many eigenvalues of the noise-free kernel matrix exceed sigma2
    (the effective rank), not on n: near exact at r = 100 for a smooth kernel in a few
    dimensions, but off by tens of percent in std for, e.g., Matern-3/2 on 8-D concrete.

:func:`choose_variance` picks ``exact`` for n <= :data:`EXACT_VARIANCE_MAX_N` (5000), else
``love``. The computed latent variance is clamped to [0, s2] (the exact value lies there; CG
and round-off can push it slightly outside, e.g. below 0 at a training input when sigma2 is tiny),
so ``var_y >= sigma2 >= noise_floor > 0`` and its square root is finite.

No array of shape (m, n) is ever formed for m test points: cross covariances are built
``batch_size`` rows at a time (default: :func:`default_batch_size`, about 16M elements).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import exact
from .kernels import NOISE_FLOOR, Hypers, Params, constrain, cross_cov
from .lanczos import lanczos, tridiag_mask, tridiag_matrix
from .matvec import Backend
from .solve import (  # noqa: F401 (CGConvergenceWarning re-exported)
    CGConvergenceWarning,
    CGInfo,
    Preconditioner,
    cg,
    make_preconditioner,
    pivoted_cholesky,
)

VARIANCE_METHODS = ("auto", "exact", "love")

# n above which "auto" switches from exact (block CG per test batch) to LOVE.
EXACT_VARIANCE_MAX_N = 5000

# Default relative-residual tolerance of the prediction solves, keyed on dtype name.
DEFAULT_CG_TOL = {"float64": 1e-8, "float32": 1e-3}

# Largest number of elements of one (batch, n) cross-covariance block (128 MiB in float64).
CROSS_COV_BUDGET = 2**24
MAX_BATCH = 1024


def scores(y, mean, var) -> tuple[float, float]:
    """Return (RMSE, mean Gaussian NLL) of predictive means ``mean`` and variances ``var`` at y."""
    err = np.asarray(y, np.float64) - np.asarray(mean, np.float64)
    var = np.asarray(var, np.float64)
    return (float(np.sqrt(np.mean(err**2))),
            float(np.mean(0.5 * np.log(2 * np.pi * var) + 0.5 * err**2 / var)))


def default_cg_tol(dtype) -> float:
    """Prediction CG tolerance for a dtype (see :data:`DEFAULT_CG_TOL`)."""
    return DEFAULT_CG_TOL[jnp.dtype(dtype).name]


def default_batch_size(n: int) -> int:
    """Test points per batch so that one (batch, n) block has <= CROSS_COV_BUDGET elements."""
    return int(max(1, min(MAX_BATCH, CROSS_COV_BUDGET // max(n, 1))))


def choose_variance(n: int) -> tuple[str, str]:
    """Variance engine for n training points; returns ``(name, reason)``."""
    if n <= EXACT_VARIANCE_MAX_N:
        return "exact", f"n={n} <= {EXACT_VARIANCE_MAX_N}: block CG per test batch"
    return "love", f"n={n} > {EXACT_VARIANCE_MAX_N}: LOVE (one Lanczos root, O(n r) per point)"


POSTERIORS = ("auto", "exact", "cg")


def choose_posterior(n: int, requested: str = "auto",
                     memory_fraction: float = 0.7) -> tuple[str, str]:
    """Resolve ``[predict] posterior`` for n training points; returns ``(name, reason)``.

    ``auto``: ``exact`` when one float64 n x n array fits in ``memory_fraction`` of the memory
    available now (:func:`gpadjoint.exact.factor_fits`), else ``cg``.
    """
    if requested not in POSTERIORS:
        raise ValueError(f"unknown posterior {requested!r}; choose one of {POSTERIORS}")
    if requested != "auto":
        return requested, "requested"
    fits, why = exact.factor_fits(n, memory_fraction)
    if fits:
        return "exact", f"auto: {why}, so the exact posterior by blocked float64 Cholesky"
    return "cg", f"auto: {why}, so CG (mean) with the configured variance engine"


def exact_factor(X, y, params: Params, *, kernel: str, noise_floor: float = NOISE_FLOOR,
                 block: int = exact.BLOCK) -> exact.Factor:
    """Return the blocked float64 Cholesky factor of K at ``params`` (internal units).

    For :func:`exact_posterior`; keep it to predict again without refactorising.
    """
    h = constrain(Params(*(jnp.asarray(a, jnp.float64) for a in params)), noise_floor)
    return exact.factor(np.asarray(X, np.float64), np.asarray(y, np.float64), h,
                        float(params.mean), kernel=kernel, block=block)


def exact_posterior(factor: exact.Factor, X_test, *, include_noise: bool = True,
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and variance (float64 numpy, (m,) each) at ``X_test``.

    ``include_noise`` as in :func:`predict_variance`; the latent variance is clamped to
    [0, s2] like the CG engines' (:func:`clamp_variance`).
    """
    return exact.posterior(factor, np.asarray(X_test, np.float64), include_noise=include_noise,
                           batch=batch_size)


def preconditioner(kernel: str, X, hypers: Hypers, rank: int) -> Preconditioner | None:
    """Pivoted-Cholesky preconditioner L L^T + sigma2 I of rank min(rank, n); None for rank 0."""
    n = X.shape[0]
    rank = min(int(rank), n)
    if rank <= 0:
        return None
    L = _pivchol(X, hypers, kernel=kernel, rank=rank)
    return make_preconditioner(L, hypers.noise)


@partial(jax.jit, static_argnames=("kernel", "rank"))
def _pivchol(X, hypers, *, kernel, rank):
    n = X.shape[0]
    return pivoted_cholesky(
        lambda i: cross_cov(kernel, lax.dynamic_slice_in_dim(X, i, 1), X, hypers)[0],
        jnp.full((n,), hypers.outputscale, X.dtype),
        rank,
    )


def _warn_if_unconverged(residual, tol: float, what: str) -> None:
    worst = float(np.max(np.asarray(residual))) if np.size(residual) else 0.0
    if not worst <= tol:
        warnings.warn(
            f"CG for the {what} stopped with relative residual {worst:.2e} > tol={tol:.1e}; "
            "raise cg_max_iter or precond_rank, or loosen the prediction tolerance",
            CGConvergenceWarning,
            stacklevel=3,
        )


def _batches(X_test, batch: int) -> Iterator[tuple[int, jax.Array, int]]:
    """Yield ``(start, block, valid)``; every block has exactly ``batch`` rows (one compile).

    The last block is padded with copies of its final row, which are real inputs, so the
    padded CG columns converge like the others; callers keep the first ``valid`` results.
    """
    m = X_test.shape[0]
    for s in range(0, m, batch):
        Xb = X_test[s : s + batch]
        valid = Xb.shape[0]
        if valid < batch:
            Xb = jnp.concatenate([Xb, jnp.broadcast_to(Xb[-1:], (batch - valid, Xb.shape[1]))])
        yield s, Xb, valid


def _batch_for(m: int, n: int, batch_size: int | None) -> int:
    b = default_batch_size(n) if batch_size is None else int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return max(1, min(b, m))


# --- mean -------------------------------------------------------------------------------------


def mean_weights(
    X,
    y,
    params: Params,
    *,
    backend: Backend,
    noise_floor: float = NOISE_FLOOR,
    precond_rank: int = 15,
    tol: float | None = None,
    max_iter: int = 1000,
) -> tuple[jax.Array, CGInfo]:
    """Mean weights alpha = K^{-1} (y - mu), shape (n,), by preconditioned CG.

    ``tol`` (relative residual |y - mu - K alpha| / |y - mu|) defaults to
    :func:`default_cg_tol` of X's dtype; warns (:class:`CGConvergenceWarning`) if CG stopped at
    ``max_iter`` first. The exact alternative is :func:`exact_posterior`.
    """
    hypers = constrain(params, noise_floor)
    tol = default_cg_tol(X.dtype) if tol is None else float(tol)
    mv, args = backend.operator(X, hypers)
    P = preconditioner(backend.kernel, X, hypers, precond_rank)
    alpha, info = _solve(y - params.mean, args, P, mv=mv, tol=tol, max_iter=int(max_iter))
    _warn_if_unconverged(info.residual, tol, "posterior mean")
    return alpha, info


@partial(jax.jit, static_argnames=("mv", "tol", "max_iter"))
def _solve(B, args, P, *, mv, tol, max_iter):
    return cg(mv, B, *args, precond=P, tol=tol, max_iter=max_iter)


def predict_mean(
    X_test,
    X,
    alpha,
    params: Params,
    *,
    kernel: str,
    noise_floor: float = NOISE_FLOOR,
    batch_size: int | None = None,
):
    """Posterior mean mu + K(X_test, X) alpha, shape (m,), ``batch_size`` test rows at a time."""
    hypers = constrain(params, noise_floor)
    m = X_test.shape[0]
    batch = _batch_for(m, X.shape[0], batch_size)
    out = [
        _mean_batch(Xb, X, alpha, hypers, params.mean, kernel=kernel)[:valid]
        for _, Xb, valid in _batches(X_test, batch)
    ]
    return jnp.concatenate(out) if out else jnp.zeros((0,), X.dtype)


@partial(jax.jit, static_argnames=("kernel",))
def _mean_batch(Xb, X, alpha, hypers, mean, *, kernel):
    return mean + cross_cov(kernel, Xb, X, hypers) @ alpha


# --- variance ---------------------------------------------------------------------------------


def clamp_variance(latent, hypers: Hypers, include_noise: bool = True):
    """Clamp a computed latent variance to [0, s2]; add sigma2 if ``include_noise``."""
    latent = jnp.clip(latent, 0.0, hypers.outputscale)
    return latent + hypers.noise if include_noise else latent


def latent_variance_exact(
    X_test,
    X,
    params: Params,
    *,
    backend: Backend,
    noise_floor: float = NOISE_FLOOR,
    precond_rank: int = 15,
    tol: float | None = None,
    max_iter: int = 1000,
    batch_size: int | None = None,
):
    """Unclamped s2 - diag(K_*^T K^{-1} K_*), shape (m,), by block CG per test batch.

    Use :func:`predict_variance` for the clamped result; this one is exposed for tests.
    """
    hypers = constrain(params, noise_floor)
    batch = _batch_for(X_test.shape[0], X.shape[0], batch_size)
    tol = default_cg_tol(X.dtype) if tol is None else float(tol)
    mv, args = backend.operator(X, hypers)
    P = preconditioner(backend.kernel, X, hypers, precond_rank)
    out, worst = [], []
    for _, Xb, valid in _batches(X_test, batch):
        v, res = _var_exact_batch(
            Xb, X, hypers, args, P, mv=mv, kernel=backend.kernel, tol=tol, max_iter=int(max_iter)
        )
        out.append(v[:valid])
        worst.append(jnp.max(res[:valid]))
    _warn_if_unconverged(jnp.stack(worst) if worst else [], tol, "predictive variance")
    return jnp.concatenate(out) if out else jnp.zeros((0,), X.dtype)


@partial(jax.jit, static_argnames=("mv", "kernel", "tol", "max_iter"))
def _var_exact_batch(Xb, X, hypers, args, P, *, mv, kernel, tol, max_iter):
    Ks = cross_cov(kernel, X, Xb, hypers)  # (n, b)
    V, info = cg(mv, Ks, *args, precond=P, tol=tol, max_iter=max_iter)
    return hypers.outputscale - jnp.sum(Ks * V, axis=0), info.residual


def love_root(
    X,
    y,
    params: Params,
    *,
    backend: Backend,
    rank: int = 100,
    noise_floor: float = NOISE_FLOOR,
):
    """LOVE root R (n, r), r = min(rank, n), with R R^T = Q T^{-1} Q^T ~= K^{-1}.

    Lanczos starts from y - mu, the right-hand side of the mean solve (as GPyTorch does); if
    that is exactly zero (constant targets) it starts from the all-ones vector instead, since a
    zero start vector spans nothing. Steps after a Lanczos breakdown (invariant subspace found)
    give zero columns.
    """
    n = X.shape[0]
    rank = min(int(rank), n)
    if rank < 1:
        raise ValueError(f"LOVE rank must be a positive integer, got {rank}")
    hypers = constrain(params, noise_floor)
    mv, args = backend.operator(X, hypers)
    b = y - params.mean
    b = jnp.where(jnp.any(b != 0), b, jnp.ones_like(b))
    return _love_root(b, args, hypers.noise, mv=mv, rank=rank)


@partial(jax.jit, static_argnames=("mv", "rank"))
def _love_root(b, args, noise, *, mv, rank):
    tri = lanczos(mv, b, *args, depth=rank, adjoint=False)
    alive = tridiag_mask(tri.beta)
    # rows after a breakdown are zero in Q and T; a unit diagonal there keeps T invertible
    T = tridiag_matrix(tri.alpha, tri.beta) + jnp.diag(jnp.where(alive, 0.0, 1.0))
    # T^{-1/2} by eigh, with the Ritz values clamped at sigma2: every Ritz value of K is
    # >= sigma2, but round-off (float32, sigma2 near its floor) can push some below it or
    # below 0, where a Cholesky of T would fail (NaN) and 1/sqrt would blow up.
    lam, V = jnp.linalg.eigh(T)
    lam = jnp.maximum(lam, noise)
    return tri.Q.T @ (V / jnp.sqrt(lam))  # (n, r); R R^T = Q^T V lam^-1 V^T Q = Q T^-1 Q^T


def latent_variance_love(
    X_test,
    X,
    R,
    params: Params,
    *,
    kernel: str,
    noise_floor: float = NOISE_FLOOR,
    batch_size: int | None = None,
):
    """Unclamped LOVE estimate s2 - |R^T k_*|^2, shape (m,), from a :func:`love_root` R."""
    hypers = constrain(params, noise_floor)
    batch = _batch_for(X_test.shape[0], X.shape[0], batch_size)
    out = [
        _var_love_batch(Xb, X, R, hypers, kernel=kernel)[:valid]
        for _, Xb, valid in _batches(X_test, batch)
    ]
    return jnp.concatenate(out) if out else jnp.zeros((0,), X.dtype)


@partial(jax.jit, static_argnames=("kernel",))
def _var_love_batch(Xb, X, R, hypers, *, kernel):
    KR = cross_cov(kernel, Xb, X, hypers) @ R  # (b, r)
    return hypers.outputscale - jnp.sum(KR * KR, axis=1)


def predict_variance(
    X_test,
    X,
    params: Params,
    *,
    backend: Backend,
    method: str = "auto",
    include_noise: bool = True,
    noise_floor: float = NOISE_FLOOR,
    precond_rank: int = 15,
    tol: float | None = None,
    max_iter: int = 1000,
    love_R=None,
    y=None,
    love_rank: int = 100,
    batch_size: int | None = None,
):
    """Predictive variance at X_test, shape (m,), clamped (see module docstring).

    ``include_noise=True`` (default) gives var_y = var_f + sigma2, the variance of a new noisy
    observation; ``False`` gives var_f. ``method``: "exact", "love" or "auto"
    (:func:`choose_variance`). For LOVE pass a cached ``love_R`` or the targets ``y`` to build
    one (:func:`love_root`, rank ``love_rank``).
    """
    if method not in VARIANCE_METHODS:
        raise ValueError(f"unknown variance method {method!r}; choose one of {VARIANCE_METHODS}")
    if method == "auto":
        method, _ = choose_variance(X.shape[0])
    hypers = constrain(params, noise_floor)
    if method == "exact":
        latent = latent_variance_exact(
            X_test, X, params, backend=backend, noise_floor=noise_floor,
            precond_rank=precond_rank, tol=tol, max_iter=max_iter, batch_size=batch_size,
        )
    else:
        if love_R is None:
            if y is None:
                raise ValueError("LOVE needs either a cached love_R or the training targets y")
            love_R = love_root(
                X, y, params, backend=backend, rank=love_rank, noise_floor=noise_floor
            )
        latent = latent_variance_love(
            X_test, X, love_R, params, kernel=backend.kernel, noise_floor=noise_floor,
            batch_size=batch_size,
        )
    return clamp_variance(latent, hypers, include_noise)

