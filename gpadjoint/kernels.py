"""Kernels and hyperparameters.

Data flow: data -> **kernels** -> matvec -> lanczos -> logdet/solve -> mll.

Every stationary kernel here is a function of the squared *scaled* distance
``r2 = |x/l - x'/l|^2`` (ARD lengthscales ``l``, shape ``(d,)``).  The full covariance is

    K(theta) = s2 * k(r2(X/l, X/l)) + sigma2 * I

with ``s2`` the output scale (a variance) and ``sigma2`` the noise variance.

Parameters are stored *unconstrained* (:class:`Params`) and mapped to positive values with
softplus only at the loss boundary (:func:`constrain`), which returns :class:`Hypers`, the
form every matvec backend consumes.  The noise gets a lower bound (default 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

NOISE_FLOOR = 1e-4


class Params(NamedTuple):
    """Unconstrained GP hyperparameters (what the optimiser sees).

    raw_lengthscale: shape (d,); raw_outputscale, raw_noise, mean: scalars.
    """

    raw_lengthscale: jax.Array
    raw_outputscale: jax.Array
    raw_noise: jax.Array
    mean: jax.Array


class Hypers(NamedTuple):
    """Constrained kernel hyperparameters, the matvec backends' input.

    lengthscale: (d,) positive; outputscale: scalar variance s2; noise: scalar variance sigma2.
    """

    lengthscale: jax.Array
    outputscale: jax.Array
    noise: jax.Array


def softplus(x):
    """Numerically stable log(1 + exp(x))."""
    return jnp.logaddexp(x, 0.0)


def softplus_inverse(y):
    """Inverse of :func:`softplus` for y > 0 (stable for large and small y)."""
    y = jnp.asarray(y)
    return y + jnp.log(-jnp.expm1(-y))


def constrain(params: Params, noise_floor: float = NOISE_FLOOR) -> Hypers:
    """Map unconstrained parameters to positive kernel hyperparameters (softplus)."""
    return Hypers(
        lengthscale=softplus(params.raw_lengthscale),
        outputscale=softplus(params.raw_outputscale),
        noise=noise_floor + softplus(params.raw_noise),
    )


def unconstrain(
    lengthscale, outputscale, noise, mean=0.0, noise_floor: float = NOISE_FLOOR, dtype=None
) -> Params:
    """Inverse of :func:`constrain`: build :class:`Params` from positive values."""
    dtype = dtype or jnp.result_type(float)
    noise = jnp.asarray(noise, dtype)
    if float(noise) <= noise_floor:
        raise ValueError(
            f"noise={float(noise)!r} must exceed the noise floor {noise_floor!r}; "
            "pass a larger initial noise or lower noise_floor"
        )
    return Params(
        raw_lengthscale=softplus_inverse(jnp.asarray(lengthscale, dtype)),
        raw_outputscale=softplus_inverse(jnp.asarray(outputscale, dtype)),
        raw_noise=softplus_inverse(noise - noise_floor),
        mean=jnp.asarray(mean, dtype),
    )


def init_params(d: int, dtype=None, key=None) -> Params:
    """Return initial parameters: raw 0 (softplus(0) = 0.693), or N(0, 1) draws given a key.

    The paper initialises every raw parameter from N(0, 1); pass ``key`` to reproduce that.
    """
    dtype = dtype or jnp.result_type(float)
    if key is None:
        z = jnp.zeros((d + 2,), dtype)
    else:
        z = jax.random.normal(key, (d + 2,), dtype)
    return Params(z[:d], z[d], z[d + 1], jnp.zeros((), dtype))


# --- single-pair kernel profiles: functions of the squared scaled distance r2 -----------------


def _safe_sqrt(r2):
    # sqrt has an infinite derivative at 0; on the diagonal (r2 == 0) the kernel value is right
    # and its gradient w.r.t. r2 is multiplied by d(r2)/d(theta) = 0, so route zero cotangent there.
    pos = r2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, r2, 1.0)), 0.0)


def rbf(r2):
    """Squared-exponential profile exp(-r2 / 2)."""
    return jnp.exp(-0.5 * r2)


def matern12(r2):
    """Matern nu=1/2 profile exp(-r)."""
    return jnp.exp(-_safe_sqrt(r2))


def matern32(r2):
    """Matern nu=3/2 profile (1 + sqrt(3) r) exp(-sqrt(3) r)."""
    r = jnp.sqrt(3.0) * _safe_sqrt(r2)
    return (1.0 + r) * jnp.exp(-r)


def matern52(r2):
    """Matern nu=5/2 profile (1 + sqrt(5) r + 5 r2 / 3) exp(-sqrt(5) r)."""
    r = jnp.sqrt(5.0) * _safe_sqrt(r2)
    return (1.0 + r + r * r / 3.0) * jnp.exp(-r)


# dk/d(r2) in closed form, finite at r2 = 0 (used by the dense backend's hand-written VJP).
# Matern-1/2 has none (its derivative is unbounded at 0) and keeps JAX autodiff.
def _rbf_d(r2):
    return -0.5 * jnp.exp(-0.5 * r2)


def _matern32_d(r2):
    return -1.5 * jnp.exp(-jnp.sqrt(3.0) * _safe_sqrt(r2))


def _matern52_d(r2):
    r = jnp.sqrt(5.0) * _safe_sqrt(r2)
    return -(5.0 / 6.0) * (1.0 + r) * jnp.exp(-r)


PROFILE_DERIVATIVES: dict[str, Callable] = {
    "rbf": _rbf_d,
    "matern32": _matern32_d,
    "matern52": _matern52_d,
}

PROFILES: dict[str, Callable] = {
    "rbf": rbf,
    "matern12": matern12,
    "matern32": matern32,
    "matern52": matern52,
}

KERNEL_NAMES = tuple(PROFILES)


def get_profile(name: str) -> Callable:
    """Return the profile k(r2) for a kernel name, with a helpful error for unknown names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown kernel {name!r}; choose one of {', '.join(KERNEL_NAMES)}"
        ) from None


def sq_dist(A, B, diag_offset=None):
    """Squared Euclidean distances between rows of A (n, d) and B (m, d), clipped at 0.

    Uses the expanded form |a|^2 + |b|^2 - 2 a.b (one GEMM) and clips round-off negatives.
    When A is the row block ``X[diag_offset : diag_offset + n]`` of B = X, the self-distances
    (row i against column diag_offset + i) are set to exactly 0, which the GEMM form misses by
    round-off (that would bias Matern-1/2 on the diagonal by sqrt(eps)).
    """
    a2 = jnp.sum(A * A, axis=-1)[:, None]
    b2 = jnp.sum(B * B, axis=-1)[None, :]
    r2 = jnp.maximum(a2 + b2 - 2.0 * (A @ B.T), 0.0)
    if diag_offset is not None:
        rows = jnp.arange(A.shape[0])[:, None] + diag_offset
        cols = jnp.arange(B.shape[0])[None, :]
        r2 = jnp.where(rows == cols, 0.0, r2)
    return r2


def sq_diff_basis(B):
    """Return the (m, 2d + 1) columns [1, B, B^2] of B (m, d), for :func:`sq_diff_sums`."""
    return jnp.concatenate([jnp.ones((B.shape[0], 1), B.dtype), B, B * B], axis=1)


def sq_diff_sums(GB, A):
    """sum_ij G_ij (A_id - B_jd)^2 per d, given GB = G @ sq_diff_basis(B) and A (n, d).

    Expanded as sum_i rows_i A_id^2 - 2 A_id (G B)_id + (G B^2)_id, so the n x m weight G is
    read once, by one product with 2d + 1 columns: XLA's row and column sums over both axes of
    G measured slower than that whole product (the lengthscale VJPs of the dense and blocked
    backends).
    """
    d = A.shape[1]
    rows, GX, GX2 = GB[:, :1], GB[:, 1 : d + 1], GB[:, d + 1 :]
    return jnp.sum(rows * (A * A) - 2.0 * A * GX + GX2, axis=0)


def cross_cov(kernel: str, A, B, hypers: Hypers, diag_offset=None):
    """Noise-free cross covariance s2 * k(A/l, B/l), shape (len(A), len(B)).

    ``diag_offset``: see :func:`sq_dist` (A is a row block of B starting at that row).
    """
    prof = get_profile(kernel)
    ls = hypers.lengthscale
    return hypers.outputscale * prof(sq_dist(A / ls, B / ls, diag_offset))


def _dense_cov_autodiff(kernel: str, X, hypers: Hypers):
    n = X.shape[0]
    return cross_cov(kernel, X, X, hypers, diag_offset=0) + hypers.noise * jnp.eye(n, dtype=X.dtype)


def dense_cov(kernel: str, X, hypers: Hypers):
    """Training covariance K = s2 * k(X/l, X/l) + sigma2 * I as a dense (n, n) array.

    Differentiable in ``hypers`` (not X). For rbf, matern32 and matern52 the VJP is written by
    hand: given Kbar it needs one elementwise pass and one (n, n) x (n, d) product, where
    autodiff through the profile stores and revisits several n x n intermediates (measured
    ~6x the build time, against ~2x here).
    """
    if kernel not in PROFILE_DERIVATIVES:
        return _dense_cov_autodiff(kernel, X, hypers)
    return _dense_cov_fast(kernel, X, hypers)


def _dense_cov_fast(kernel, X, hypers):
    @jax.custom_vjp
    def build(X, hypers):
        return _dense_cov_autodiff(kernel, X, hypers)

    def fwd(X, hypers):
        K = _dense_cov_autodiff(kernel, X, hypers)
        return K, (X, hypers, K)

    def bwd(res, Kbar):
        X, h, K = res
        ls = h.lengthscale
        Xs = X / ls
        trace = jnp.trace(Kbar)
        # sum Kbar o k(R2) with k(R2) = (K - sigma2 I) / s2
        s2bar = (jnp.sum(Kbar * K) - h.noise * trace) / h.outputscale
        G = Kbar * PROFILE_DERIVATIVES[kernel](sq_dist(Xs, Xs, diag_offset=0))
        quad = sq_diff_sums(G @ sq_diff_basis(Xs), Xs)
        lbar = -2.0 * h.outputscale * quad / ls
        return jnp.zeros_like(X), Hypers(lbar, s2bar, trace)

    build.defvjp(fwd, bwd)
    return build(X, hypers)
