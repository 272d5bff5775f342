r"""The exact float64 path: loss, gradient and posterior from one blocked Cholesky factor.

Data flow: kernels -> **exact** -> mll / evaluate / predict / model. With
K = s2 k(X/l, X/l) + sigma2 I (n x n), r = y - mu and alpha = K^-1 r:

    loss      = [r^T K^-1 r + log det K + n log 2 pi] / (2 n)        (-log p(y | theta) / n)
    dloss/dK  = Kbar = (K^-1 - alpha alpha^T) / (2 n)                 (pulled back to theta)
    dloss/dmu = -sum(alpha) / n
    mean(x*)  = mu + k(x*, X) alpha
    var(x*)   = s2 - |L^-1 k(X, x*)|^2   (+ sigma2 for a new noisy observation)

Everything is in float64 on one n x n array (8 n^2 bytes), which holds in turn K's lower
triangle (:func:`build_lower`), its Cholesky factor L (:func:`cholesky_in_place`) and, for the
gradient only, K^-1's lower triangle (:func:`inverse_in_place`). Every step goes by blocks of
``block`` rows: LAPACK only ever sees block-sized pieces (one LAPACK call on a whole 36 000 x
36 000 matrix crashed; see :func:`cholesky_in_place`) and no second n x n array is made.

K is built by ONE row-block builder (:func:`_kernel_blocks`): rows i:e against columns i: (the
upper triangle of those rows, written transposed into the lower triangle), and the gradient
pulls Kbar back through the same block, off-diagonal columns doubled (Kbar is symmetric), so the
pullback visits each kernel pair once. Its VJP is written by hand like
:func:`gpadjoint.kernels.dense_cov`'s: one elementwise pass and one (b, m) x (m, 2d + 1) product
per block, where autodiff through the profile would keep several block-sized intermediates.

Users: the exact estimator (:mod:`gpadjoint.mll`; at small n under jit it keeps a dense JAX
Cholesky that shares :func:`neg_mll_from_terms` and is tested equal to this path), the
evaluator (:mod:`gpadjoint.evaluate`), prediction (:class:`gpadjoint.model.GPRegressor` with
``[predict] method = exact``) and the reference fit (``scripts/exact_optimum.py``).
"""

from __future__ import annotations

import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .kernels import (
    NOISE_FLOOR,
    PROFILE_DERIVATIVES,
    Hypers,
    Params,
    constrain,
    cross_cov,
    get_profile,
    sq_diff_basis,
    sq_diff_sums,
    sq_dist,
)

__all__ = [
    "Factor", "neg_mll_from_terms", "factor_fits", "as_hypers", "build_lower",
    "cholesky_in_place", "solve_lower", "solve_lower_t", "inverse_in_place",
    "trace_of_inverse", "factor", "value_and_grad", "posterior", "make_value_and_grad",
    "flatten", "unflatten",
]

LOG2PI = math.log(2.0 * math.pi)
BLOCK = 1024  # rows per block: (block, n) float64 pieces beside the n x n array


def neg_mll_from_terms(quad, logdet, n: int):
    """-log p(y | theta) / n from r^T K^-1 r and log det K (2 pi included; the one formula).

    Works on floats and on traced JAX scalars alike (the dense estimator in :mod:`gpadjoint.mll`
    uses it under jit).
    """
    return 0.5 * (quad + logdet + n * LOG2PI) / n


def factor_fits(n: int, memory_fraction: float = 0.7) -> tuple[bool, str]:
    """Whether one float64 n x n array fits in ``memory_fraction`` of available memory, and why.

    The factorisation is in place, so besides that array it needs a few (block, n) pieces and
    the process itself; 0.7 leaves room for both.
    """
    from .matvec import available_memory_bytes

    need = 8 * n * n
    avail = available_memory_bytes()
    if need <= memory_fraction * avail:
        return True, f"K needs {need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available"
    return False, (f"K would need {need / 2**30:.1f} GiB, more than {memory_fraction:.0%} of "
                   f"{avail / 2**30:.1f} GiB available")


def as_hypers(lengthscale, outputscale, noise) -> Hypers:
    """Constrained hyperparameters as float64 JAX arrays (lengthscale (d,) or a scalar)."""
    with jax.enable_x64(True):
        return Hypers(
            lengthscale=jnp.asarray(np.asarray(lengthscale, np.float64).reshape(-1)),
            outputscale=jnp.asarray(float(outputscale), jnp.float64),
            noise=jnp.asarray(float(noise), jnp.float64),
        )


# --- the one K builder and its pullback ----------------------------------------------------


@functools.lru_cache(maxsize=8)
def _kernel_blocks(kernel: str):
    """``(build, pull)``, jitted, for the rows Xb = X[i:e] against the columns Xc = X[i:].

    ``build(h, Xb, Xc)`` is K[i:e, i:] (noise on the leading square's diagonal);
    ``pull(h, Xb, Xc, W)`` is sum_ij W_ij dK_ij / dh as a :class:`Hypers` (d/d lengthscale,
    d/d outputscale, d/d noise).
    """
    prof = get_profile(kernel)
    dprof = PROFILE_DERIVATIVES[kernel]

    def eye(b, m):
        return jnp.arange(b)[:, None] == jnp.arange(m)[None, :]

    @jax.jit
    def build(h, Xb, Xc):
        return cross_cov(kernel, Xb, Xc, h, diag_offset=0) + jnp.where(
            eye(Xb.shape[0], Xc.shape[0]), h.noise, 0.0)

    @jax.jit
    def pull(h, Xb, Xc, W):
        ls = h.lengthscale
        Bs, Cs = Xb / ls, Xc / ls
        r2 = sq_dist(Bs, Cs, diag_offset=0)
        s2bar = jnp.sum(W * prof(r2))  # dK/ds2 = k(r2)
        nbar = jnp.sum(jnp.where(eye(*W.shape), W, 0.0))  # dK/dnoise = I
        G = W * dprof(r2)
        quad = sq_diff_sums(G @ sq_diff_basis(Cs), Bs)  # sum_ij G_ij (b_i - c_j)^2 per dim
        # r2 = sum_d (b_d - c_d)^2 / l_d^2, so dK/dl_d = -2 s2 k'(r2) (b_d - c_d)^2 / l_d^3
        lbar = -2.0 * h.outputscale * quad / ls
        return Hypers(lbar, s2bar, nbar)

    return build, pull


def build_lower(X, h: Hypers, kernel: str, block: int = BLOCK, out=None) -> np.ndarray:
    """K's lower triangle in an n x n float64 array (``out`` is reused when given).

    The strict upper triangle is left as it was (uninitialised for a new array).
    """
    X = jnp.asarray(X, jnp.float64)
    n = X.shape[0]
    A = np.empty((n, n), np.float64) if out is None else out
    build, _ = _kernel_blocks(kernel)
    for i in range(0, n, block):
        e = min(i + block, n)
        A[i:, i:e] = np.asarray(build(h, X[i:e], X[i:])).T
    return A


# --- blocked dense linear algebra on the lower triangle ----------------------------------------


def cholesky_in_place(A: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Factorise the symmetric positive definite ``A`` in place: its lower triangle becomes L.

    Right-looking and blocked: LAPACK only ever sees ``block``-sized pieces and the trailing
    updates are numpy matrix products. One LAPACK call on the whole matrix (scipy's
    ``cholesky``) crashed at n = 36 000 (kin40k): it could not address the 10 GB array. Memory
    stays one n x n array plus an (n, block) panel. Only the lower triangle is read; the strict
    upper triangle is left as it was.
    """
    import scipy.linalg as sla

    n = A.shape[0]
    for k in range(0, n, block):
        e = min(k + block, n)
        try:
            A[k:e, k:e] = sla.cholesky(A[k:e, k:e], lower=True, check_finite=False)
        except np.linalg.LinAlgError as err:
            raise np.linalg.LinAlgError(
                f"the float64 kernel matrix is not positive definite (pivot block {k}:{e}): "
                f"{err}; raise the noise (floor)") from err
        if e == n:
            break
        L11 = A[k:e, k:e]
        # panel: L21 = A21 L11^-T
        A[e:, k:e] = sla.solve_triangular(L11, A[e:, k:e].T, lower=True,
                                          check_finite=False).T
        L21 = A[e:, k:e]
        # trailing update of the lower triangle, one column block at a time
        for j in range(e, n, block):
            je = min(j + block, n)
            A[j:, j:je] -= L21[j - e :] @ L21[j - e : je - e].T
    return A


def solve_lower(L: np.ndarray, r: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Solve L z = r (r: (n,) or (n, m)) for the lower triangle of L, block row by block row."""
    import scipy.linalg as sla

    n = L.shape[0]
    z = np.empty(r.shape, np.float64)
    for k in range(0, n, block):
        e = min(k + block, n)
        rhs = r[k:e] - L[k:e, :k] @ z[:k]
        z[k:e] = sla.solve_triangular(L[k:e, k:e], rhs, lower=True, check_finite=False)
    return z


def solve_lower_t(L: np.ndarray, z: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Solve L^T a = z (z: (n,) or (n, m)) for the lower triangle of L, from the last block."""
    import scipy.linalg as sla

    n = L.shape[0]
    a = np.empty(z.shape, np.float64)
    for k in range(((n - 1) // block) * block, -1, -block):
        e = min(k + block, n)
        rhs = z[k:e] - L[e:, k:e].T @ a[e:]
        a[k:e] = sla.solve_triangular(L[k:e, k:e], rhs, lower=True, trans="T",
                                      check_finite=False)
    return a


def _tril_block(A, r0, r1, c0, c1):
    """Return a copy of A[r0:r1, c0:c1] with the entries above the diagonal of A zeroed."""
    P = np.array(A[r0:r1, c0:c1])
    rows = np.arange(r0, r1)[:, None]
    cols = np.arange(c0, c1)[None, :]
    P[cols > rows] = 0.0
    return P


def inverse_in_place(A: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Overwrite the lower factor L in A's lower triangle with that of K^-1 = L^-T L^-1.

    Two blocked passes, no second array: first L^-1 (block columns from the last: with M = L^-1
    known below and right of block k, M21 = -M22 L21 L11^-1), then K^-1 = M^T M by block rows
    from the first ((K^-1)_IJ = sum_{k >= I} M_kI^T M_kJ reads only rows >= I, so row I may be
    overwritten once done). Together 2 n^3 / 3 flops, as LAPACK's dpotri.
    """
    from scipy.linalg import lapack

    n = A.shape[0]
    starts = list(range(0, n, block))
    for k in reversed(starts):
        e = min(k + block, n)
        inv, info = lapack.dtrtri(A[k:e, k:e], lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dtrtri info={info}: a singular factor block {k}:{e}")
        if e < n:
            T = A[e:, k:e] @ np.tril(inv)  # L21 L11^-1, (n - e, b)
            out = np.empty_like(T)
            for j in range(e, n, block):  # out = M22 T, M22 lower triangular
                je = min(j + block, n)
                out[j - e : je - e] = _tril_block(A, j, je, e, je) @ T[: je - e]
            A[e:, k:e] = -out
        A[k:e, k:e] = np.tril(inv) + np.triu(A[k:e, k:e], 1)
    for i in starts:
        e = min(i + block, n)
        P = _tril_block(A, i, n, i, e)  # column block I of M, rows >= I
        for j in range(0, e, block):
            je = min(j + block, e)
            A[i:e, j:je] = P.T @ _tril_block(A, i, n, j, je)
    return A


def trace_of_inverse(L: np.ndarray, block: int = BLOCK) -> float:
    """tr(K^-1) = ||L^-1||_F^2 from the factor, one block of columns of L^-1 at a time.

    n^3 / 6 flops and an (n, block) piece of memory: for when no second n x n array fits and
    K^-1 itself is not needed (:func:`gpadjoint.evaluate.exact_scale_gradient`).
    """
    import scipy.linalg as sla

    n = L.shape[0]
    total = 0.0
    for c in range(0, n, block):
        ce = min(c + block, n)
        Z = np.empty((n - c, ce - c), np.float64)  # rows c: of L^-1[:, c:ce]; above c it is 0
        for i in range(c, n, block):
            ie = min(i + block, n)
            rhs = np.eye(ce - c) if i == c else -(L[i:ie, c:i] @ Z[: i - c])
            Z[i - c : ie - c] = sla.solve_triangular(L[i:ie, i:ie], rhs, lower=True,
                                                     check_finite=False)
        total += float(np.sum(Z * Z))
    return total


# --- the factor and what it gives -------------------------------------------------------------


class Factor(NamedTuple):
    """One blocked Cholesky factorisation of K at (h, mean), with what the loss needs.

    ``L``: the n x n array whose lower triangle is the factor (consumed by
    :func:`value_and_grad`, which inverts it in place); ``alpha`` = K^-1 (y - mean);
    ``logdet`` = log det K; ``quad`` = (y - mean)^T K^-1 (y - mean); ``X`` the (n, d) inputs.
    """

    L: np.ndarray
    alpha: np.ndarray
    logdet: float
    quad: float
    X: np.ndarray
    h: Hypers
    mean: float
    kernel: str
    block: int

    @property
    def n(self) -> int:
        """Number of training points."""
        return self.L.shape[0]

    @property
    def loss(self) -> float:
        """-log p(y | theta) / n, 2 pi included."""
        return float(neg_mll_from_terms(self.quad, self.logdet, self.n))


def _checked(X, y, mean, h: Hypers):
    X = np.asarray(X, np.float64)
    r = np.asarray(y, np.float64) - float(mean)
    n = X.shape[0]
    if X.ndim != 2 or r.shape != (n,):
        raise ValueError(f"X must be (n, d) and y (n,); got {X.shape} and {r.shape}")
    if not (float(h.noise) > 0 and float(h.outputscale) > 0
            and bool(np.all(np.asarray(h.lengthscale) > 0))):
        raise ValueError(f"hyperparameters must be positive; got {h}")
    return X, r


def factor(X, y, h: Hypers, mean: float, *, kernel: str, block: int = BLOCK, out=None,
           timings: dict | None = None) -> Factor:
    """Build K at ``h`` into one n x n float64 array (``out`` if given), factorise, whiten.

    ``h``: constrained hyperparameters (:func:`as_hypers`) in the units of X and y; ``mean``
    the constant mean. ``timings`` (optional dict) receives the seconds of ``build`` and
    ``potrf`` (the factorisation).
    """
    with jax.enable_x64(True):
        h = Hypers(*(jnp.asarray(a, jnp.float64) for a in h))
        X, r = _checked(X, y, mean, h)
        t = time.perf_counter()
        A = build_lower(X, h, kernel, block, out=out)
        t1 = time.perf_counter()
        cholesky_in_place(A, block)
        t2 = time.perf_counter()
        z = solve_lower(A, r, block)
        alpha = solve_lower_t(A, z, block)
    if timings is not None:
        timings.update(build=t1 - t, potrf=t2 - t1)
    return Factor(A, alpha, 2.0 * float(np.sum(np.log(np.diagonal(A)))), float(z @ z), X, h,
                  float(mean), kernel, block)


def value_and_grad(f: Factor, timings: dict | None = None) -> tuple[float, Hypers, float]:
    """(loss, dloss/dh as :class:`Hypers`, dloss/dmean) from a factor, which it consumes.

    K^-1 overwrites the factor in place (:func:`inverse_in_place`); Kbar = (K^-1 - alpha
    alpha^T) / (2n) is then formed block row by block row and pulled back through the builder
    (:func:`_kernel_blocks`), the columns right of each diagonal block doubled. ``timings``
    receives ``potri`` (the inverse) and ``pullback`` seconds.
    """
    n, block, A, alpha = f.n, f.block, f.L, f.alpha
    with jax.enable_x64(True):
        t = time.perf_counter()
        inverse_in_place(A, block)
        t1 = time.perf_counter()
        _, pull = _kernel_blocks(f.kernel)
        Xj = jnp.asarray(f.X)
        g = None
        scale = 1.0 / (2.0 * n)
        for i in range(0, n, block):
            e = min(i + block, n)
            W = np.array(A[i:, i:e].T)  # rows i:e, columns i: of K^-1 (lower triangle's view)
            D = W[:, : e - i]
            D[:] = np.triu(D) + np.triu(D, 1).T  # the diagonal block from its lower half
            W -= np.outer(alpha[i:e], alpha[i:])
            W *= scale
            W[:, e - i :] *= 2.0  # Kbar_ij and Kbar_ji: the pair visited once
            gi = pull(f.h, Xj[i:e], Xj[i:], jnp.asarray(W))
            g = gi if g is None else jax.tree.map(jnp.add, g, gi)
        t2 = time.perf_counter()
    if timings is not None:
        timings.update(potri=t1 - t, pullback=t2 - t1)
    g = Hypers(*(np.asarray(v, np.float64) for v in g))
    return f.loss, g, -float(np.sum(alpha)) / n


def posterior(f: Factor, X_test, *, include_noise: bool = True,
              batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive mean and variance at ``X_test`` (m, d) from an intact factor.

    mean = mu + k(x*, X) alpha and var = s2 - |L^-1 k(X, x*)|^2, clamped to [0, s2] against
    round-off, plus sigma2 with ``include_noise`` (a new noisy observation, as scikit-learn's
    GaussianProcessRegressor with a WhiteKernel). ``batch`` test rows at a time (default the
    factor's block), so memory beyond the factor is (batch, n).
    """
    Xt = np.asarray(X_test, np.float64)
    if Xt.ndim != 2 or Xt.shape[1] != f.X.shape[1]:
        raise ValueError(f"X_test must be (m, {f.X.shape[1]}) like X; got {Xt.shape}")
    batch = f.block if batch is None else int(batch)
    m = Xt.shape[0]
    mu, var = np.empty(m), np.empty(m)
    s2, noise = float(f.h.outputscale), float(f.h.noise)
    with jax.enable_x64(True):
        Xj = jnp.asarray(f.X)
        h = f.h
        cross = jax.jit(lambda A: cross_cov(f.kernel, A, Xj, h))
        for i in range(0, m, batch):
            Ks = np.asarray(cross(jnp.asarray(Xt[i : i + batch])))  # (b, n)
            mu[i : i + batch] = f.mean + Ks @ f.alpha
            V = solve_lower(f.L, Ks.T, f.block)  # L^-1 k(X, x*) for this batch
            var[i : i + batch] = np.clip(s2 - np.sum(V * V, axis=0), 0.0, s2)
    return mu, var + noise if include_noise else var


# --- raw coordinates: the optimiser's value and gradient -----------------------------------


def flatten(p: Params) -> np.ndarray:
    """[raw_lengthscale (d), raw_outputscale, raw_noise, mean] as one float64 vector."""
    return np.concatenate([np.asarray(p.raw_lengthscale, np.float64).ravel(),
                           np.asarray([p.raw_outputscale, p.raw_noise, p.mean], np.float64)])


def unflatten(theta) -> Params:
    """Inverse of :func:`flatten` (numpy float64 pieces)."""
    t = np.asarray(theta, np.float64)
    return Params(t[:-3], t[-3], t[-2], t[-1])


def make_value_and_grad(X, y, *, kernel: str, noise_floor: float = NOISE_FLOOR,
                        block: int = BLOCK, timings: dict | None = None):
    """Return ``f(theta) -> (loss, grad)`` for raw parameters flattened by :func:`flatten`.

    loss = -log p(y | theta) / n (2 pi included) with the noise ``noise_floor + softplus``;
    grad its gradient in theta, both float64. One n x n array, allocated on the first call and
    reused. ``timings`` receives the seconds of ``build``, ``potrf``, ``potri`` and
    ``pullback`` of the last call.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    buf = {}

    def to_hypers(raw):
        return constrain(Params(raw[:-2], raw[-2], raw[-1], jnp.zeros((), raw.dtype)),
                         noise_floor)

    def fg(theta):
        theta = np.asarray(theta, np.float64)
        T = {}
        with jax.enable_x64(True):
            raw = jnp.asarray(theta[:-1])
            h, back = jax.vjp(to_hypers, raw)
            f = factor(X, y, h, float(theta[-1]), kernel=kernel, block=block,
                       out=buf.get("A"), timings=T)
            buf["A"] = f.L
            loss, gh, g_mean = value_and_grad(f, timings=T)
            g_raw = np.asarray(back(Hypers(*(jnp.asarray(v) for v in gh)))[0])
        if timings is not None:
            timings.clear()
            timings.update(T)
        return loss, np.concatenate([g_raw, [g_mean]])

    return fg
