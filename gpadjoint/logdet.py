r"""Stochastic Lanczos quadrature (SLQ) for log det A.

Data flow: lanczos -> **logdet** / solve -> mll.

    log det A = tr log A ~= (1/p) sum_i |z_i|^2  e_1^T log(T_i) e_1

over p probe vectors z_i (Rademacher: |z_i|^2 = n), each with its own depth-k tridiagonal T_i.
Gradients reach A through the Lanczos adjoint (:mod:`gpadjoint.lanczos`); the small k x k
quadrature e_1^T f(T) e_1 has its own VJP from the Daleckii-Krein formula

    d/dT [e_1^T f(T) e_1] = V (F o (u u^T)) V^T,   T = V diag(lam) V^T,  u = V^T e_1,
    F_ij = (f(lam_i) - f(lam_j)) / (lam_i - lam_j)   (f'(lam_i) when lam_i ~= lam_j),

which, unlike the generic eigh derivative, stays finite for (nearly) repeated Ritz values.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import jax
import jax.numpy as jnp
from jax import lax

from .lanczos import lanczos, tridiag_mask


def _divided_differences(lam, f, fprime):
    li, lj = lam[:, None], lam[None, :]
    diff = li - lj
    scale = jnp.maximum(jnp.abs(li), jnp.abs(lj))
    close = jnp.abs(diff) <= 1e3 * jnp.finfo(lam.dtype).eps * scale
    safe = jnp.where(close, 1.0, diff)
    mid = 0.5 * (li + lj)
    return jnp.where(close, fprime(mid), (f(li) - f(lj)) / safe)


def make_quadform(f: Callable, fprime: Callable) -> Callable:
    """Return ``g(alpha, beta, lower) = e_1^T f(T) e_1``; alpha (k,), beta (k-1,) define T.

    Ritz values below ``lower`` (round-off can push them there in float32) are clamped to it
    before f is applied; the gradient treats the clamp as the identity and gives ``lower`` none.
    """

    def eig(alpha, beta, lower):
        T = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
        lam, V = jnp.linalg.eigh(T)
        return jnp.maximum(lam, lower), V

    @jax.custom_vjp
    def g(alpha, beta, lower):
        lam, V = eig(alpha, beta, lower)
        return jnp.sum(V[0] ** 2 * f(lam))

    def fwd(alpha, beta, lower):
        lam, V = eig(alpha, beta, lower)
        return jnp.sum(V[0] ** 2 * f(lam)), (lam, V, lower)

    def bwd(res, gbar):
        lam, V, lower = res
        u = V[0]
        G = V @ (_divided_differences(lam, f, fprime) * jnp.outer(u, u)) @ V.T
        return gbar * jnp.diag(G), gbar * 2.0 * jnp.diag(G, 1), jnp.zeros_like(lower)

    g.defvjp(fwd, bwd)
    return g


# e_1^T log(T) e_1 and its derivative, the quadrature of SLQ's log det for one probe
logdet_quadform = make_quadform(jnp.log, lambda x: 1.0 / x)


def masked_quadform(alpha, beta, lower, quadform):
    """Apply ``quadform`` to a tridiagonal that may have broken down.

    After a breakdown the Lanczos outputs are zero; the dead block is replaced by the identity
    (decoupled from e_1, f(1) = log 1 = 0), which leaves e_1^T f(T) e_1 unchanged.
    """
    mask = tridiag_mask(beta)
    a = jnp.where(mask, alpha, 1.0)
    b = jnp.where(mask[1:], beta[:-1], 0.0)
    return quadform(a, b, lower)


def slq_logdet(mv: Callable, probes: jax.Array, *args, depth: int, lower: float = 0.0) -> jax.Array:
    """SLQ estimate of log det A(args) from probes (n, p); differentiable via the Lanczos adjoint.

    Args:
        mv: operator ``mv(V, *args) = A V`` (symmetric positive definite A).
        probes: (n, p) probe block, e.g. Rademacher; each column gives one quadrature.
        *args: the operator's arguments (receive gradients).
        depth: Lanczos depth k per probe.
        lower: clamp for Ritz values (a known lower bound on A's spectrum, e.g. the noise).

    Returns:
        scalar estimate (1/p) sum_i |z_i|^2 e_1^T log(T_i) e_1.

    """
    return slq_from_tridiag(lanczos(mv, probes, *args, depth=depth), lower)


def slq_from_tridiag(tri, lower) -> jax.Array:
    """(1/p) sum_i |z_i|^2 e_1^T log(T_i) e_1 from the :class:`~gpadjoint.lanczos.Tridiag`."""
    return jnp.mean(slq_terms(tri, lower))


def slq_terms(tri, lower) -> jax.Array:
    """(p,) the probes' terms |z_i|^2 e_1^T log(T_i) e_1 of :func:`slq_from_tridiag`."""
    lower = jnp.asarray(lower, tri.alpha.dtype)
    per_probe = jax.vmap(lambda a, b: masked_quadform(a, b, lower, logdet_quadform))(
        tri.alpha, tri.beta
    )
    return tri.norm**2 * per_probe


def preconditioned_slq_logdet(
    mv: Callable, probes: jax.Array, *args, L: jax.Array, shift, depth: int
) -> jax.Array:
    """SLQ estimate of log det A(args) split by a fixed preconditioner P = L L^T + shift I.

    log det A = log det P + log det(P^{-1/2} A P^{-1/2}). The first term is exact and cheap
    (determinant lemma, r x r); SLQ only estimates the second, whose operator has its spectrum
    clustered near 1 when P captures A's large eigenvalues, so depth-k quadrature is far more
    accurate and the probe variance far smaller than SLQ on A itself. P is a constant (no
    gradient flows into L or shift), so the gradient is that of the second term alone and still
    estimates tr(A^{-1} dA) without bias; it comes from the same Lanczos adjoint.

    P^{-1/2} is applied in O(n r) from the thin SVD L = U S V^T:
    P^{-1/2} = shift^{-1/2} (I + U diag((1 + S^2 / shift)^{-1/2} - 1) U^T).

    Args:
        mv: operator ``mv(V, *args) = A V`` (as :func:`slq_logdet`).
        probes: (n, p) probe block.
        *args: the operator's arguments (receive gradients).
        depth: Lanczos depth per probe.
        L: (n, r) low-rank factor of A's noise-free part (e.g. pivoted Cholesky).
        shift: the diagonal shift, a lower bound of A's spectrum (the noise variance).

    """
    half, logdet_P, lower = half_inverse_factors(L, shift, probes.dtype)
    est = slq_logdet(preconditioned_mv(mv), probes, *args, *half, depth=depth, lower=lower)
    return logdet_P + est


def half_inverse_factors(L: jax.Array, shift, dtype):
    """Factors of P^{-1/2} for P = L L^T + shift I (no gradient), log det P, and a lower bound.

    Returns ``((U, c, scale), log det P, lower)``: P^{-1/2} V = scale (V + U diag(c) U^T V)
    (:func:`half_inverse`), and ``lower`` half the smallest possible eigenvalue of
    P^{-1/2} A P^{-1/2} when A >= shift I (the Ritz-value clamp).
    """
    n = L.shape[0]
    L = lax.stop_gradient(L)
    shift = lax.stop_gradient(jnp.asarray(shift, dtype))
    U, S, _ = jnp.linalg.svd(L, full_matrices=False)
    ratio = S**2 / shift
    c = lax.rsqrt(1.0 + ratio) - 1.0
    scale = lax.rsqrt(shift)
    logdet_P = n * jnp.log(shift) + jnp.sum(jnp.log1p(ratio))
    # spectrum of P^{-1/2} A P^{-1/2} >= shift * lambda_min(P^{-1}) = 1 / (1 + max ratio)
    lower = 0.5 / (1.0 + jnp.max(ratio, initial=0.0))
    return (U, c, scale), logdet_P, lower


def half_inverse(V, U, c, scale):
    """P^{-1/2} V from the factors of :func:`half_inverse_factors`."""
    return scale * (V + U @ (c[:, None] * (U.T @ V)))


@cache
def preconditioned_mv(mv: Callable) -> Callable:
    """Wrap ``mv(V, *args)`` as ``mv_pre(V, *args, U, c, scale)`` = S A S V, S = P^{-1/2}.

    The trailing three arguments are the factors of :func:`half_inverse_factors`.
    """
    # One wrapper object per mv (cached), so jit caches keyed on the operator stay valid.
    def mv_pre(V, *args):
        *margs, U, c, scale = args
        W = half_inverse(V if V.ndim == 2 else V[:, None], U, c, scale)
        out = half_inverse(mv(W, *margs), U, c, scale)
        return out if V.ndim == 2 else out[:, 0]

    return mv_pre


def rademacher(key, n: int, p: int, dtype) -> jax.Array:
    """(n, p) matrix of independent +-1 entries."""
    return jax.random.rademacher(key, (n, p), dtype=dtype)
