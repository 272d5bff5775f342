r"""Kernel tiles: the pieces every on-the-fly matvec (blocked, sharded) is built from.

Data flow: kernels -> **tiles** -> matvec / sharding -> lanczos. Both
:mod:`gpadjoint.matvec` and :mod:`gpadjoint.sharding` import from here, and neither from the
other.

Three tile functions, one per job, for a row block ``A`` (t, d) against a column block ``B``
(c, d) of the same training set (``offset``: the column of B that row 0 of A is, so the
self-distances come out exactly 0; see :func:`gpadjoint.kernels.sq_dist`):

* :func:`kv_tile` -- the product ``K[A, B] V[B]``;
* :func:`hbar_tile` -- the hyperparameter cotangent ``sum_ij W_ij dK_ij/dtheta`` of a weighted
  tile in closed form (rbf, matern32, matern52), with W the outer product of the cotangent and the
  input columns (``W = U[A] V[B]^T``, and for a symmetric pass its mirror term too);
* :func:`hbar_tile_autodiff` -- the same by autodiff through the tile (matern12, whose profile
  has no derivative at 0).

Mixed precision (``mixed=True``): the kernel *entries* are evaluated in float32 -- distances
still formed in the working dtype, then the profile (the exponential, the costly part) in float32
-- and converted back before any product or sum, so products and sums accumulate in the working
dtype and the Krylov vectors never leave it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .kernels import Hypers, cross_cov, sq_diff_sums


def pad_rows(A, multiple):
    """Return A (n, ...) with zero rows appended up to the next multiple of ``multiple``."""
    pad = (-A.shape[0]) % multiple
    if pad == 0:
        return A
    return jnp.concatenate([A, jnp.zeros((pad,) + A.shape[1:], A.dtype)], axis=0)


def tile_sq_dist(As, Bs, offset=None):
    """Squared distances of rows of As (t, d) to rows of Bs (c, d), as one GEMM, clipped at 0.

    The same expansion |a|^2 + |b|^2 - 2 a.b as :func:`gpadjoint.kernels.sq_dist`, with the
    norms folded into the product ([-2 a, |a|^2, 1] . [b, 1, |b|^2]), so nothing but the clip
    (and the exact zero of the self-distances, row i against column ``offset + i``) follows the
    GEMM; the broadcast sums of the plain form measured slower than the whole product.
    """
    a2 = jnp.sum(As * As, axis=1, keepdims=True)
    b2 = jnp.sum(Bs * Bs, axis=1, keepdims=True)
    left = jnp.concatenate([-2.0 * As, a2, jnp.ones_like(a2)], axis=1)
    right = jnp.concatenate([Bs, jnp.ones_like(b2), b2], axis=1)
    r2 = jnp.maximum(left @ right.T, 0.0)
    if offset is not None:
        rows = jnp.arange(As.shape[0])[:, None] + offset
        cols = jnp.arange(Bs.shape[0])[None, :]
        r2 = jnp.where(rows == cols, 0.0, r2)
    return r2


def profile_entries(prof: Callable, R2, mixed: bool = False):
    """``prof(R2)`` in R2's dtype; with ``mixed``, evaluated in float32 and converted back."""
    if not mixed or R2.dtype == jnp.float32:
        return prof(R2)
    return prof(R2.astype(jnp.float32)).astype(R2.dtype)


def kv_tile(prof: Callable, As, Bs, V, outputscale, offset, mixed: bool = False):
    """``s2 k(A, B) @ V`` for *scaled* inputs ``As = A / l`` (t, d), ``Bs`` (c, d), V (c, m)."""
    return (outputscale * profile_entries(prof, tile_sq_dist(As, Bs, offset), mixed)) @ V


def hbar_tile(prof: Callable, dprof: Callable, As, Bs, basis_B, W, offset, mixed: bool = False):
    """``(sum W o k(R2), sum_ij G_ij (As_i - Bs_j)^2)`` with ``G = W o k'(R2)``, in closed form.

    ``As`` (t, d), ``Bs`` (c, d) scaled inputs, ``basis_B = sq_diff_basis(Bs)`` (c, 2d + 1),
    W (t, c). Summed over all tiles, the first is the output scale's cotangent and the second,
    times ``-2 s2 / l``, the lengthscales' (see :func:`finish_hbar`). One elementwise pass over
    the tile and one (t, c) x (c, 2d + 1) product: nothing of the tile is kept.
    """
    R2 = tile_sq_dist(As, Bs, offset)
    s2bar = jnp.sum(W * profile_entries(prof, R2, mixed))
    quad = sq_diff_sums((W * profile_entries(dprof, R2, mixed)) @ basis_B, As)
    return s2bar, quad


def finish_hbar(hypers: Hypers, s2bar, quad, noise_bar) -> Hypers:
    """Return the hypers' cotangent from the summed :func:`hbar_tile` terms and ``noise_bar``."""
    ls = hypers.lengthscale
    return Hypers(-2.0 * hypers.outputscale * quad / ls, s2bar, noise_bar)


def hbar_tile_autodiff(kernel: str, A, B, W, hypers: Hypers, offset) -> Hypers:
    """Cotangent of hypers for ``sum W o K[A, B]`` (noise-free) by autodiff through the tile."""
    return jax.grad(lambda h: jnp.sum(W * cross_cov(kernel, A, B, h, offset)))(hypers)


def symmetric_operator(forward: Callable, hypers_vjp: Callable) -> Callable:
    """Wrap ``forward(V, X, hypers) = K V`` (K symmetric) as ``mv`` with a memory-light VJP.

    The cotangent of V is ``forward(U, X, hypers)`` (K^T U = K U; dropped as dead code when
    unused), X gets none (inputs are data), and the hyperparameters get
    ``hypers_vjp(X, U, V, hypers)``, the gradient of <U, K(hypers) V>: nothing of K is kept
    for the backward pass. Every backend that never forms K (blocked, KeOps, sharded) uses it.
    """

    @jax.custom_vjp
    def mv(V, X, hypers):
        return forward(V, X, hypers)

    def fwd(V, X, hypers):
        return forward(V, X, hypers), (V, X, hypers)

    def bwd(res, U):
        V, X, hypers = res
        return forward(U, X, hypers), jnp.zeros_like(X), hypers_vjp(X, U, V, hypers)

    mv.defvjp(fwd, bwd)
    return mv
