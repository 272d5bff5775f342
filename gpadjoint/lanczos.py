r"""Block Lanczos tridiagonalisation with full reorthogonalisation, and its adjoint.

Data flow: matvec -> **lanczos** -> logdet/solve -> mll. This module knows nothing
about kernels: it takes an operator ``mv(V, *args) = A(args) V`` with A symmetric, and runs m
independent Lanczos processes at once (one per column of the start block), so every step costs
*one* call of ``mv`` on an (n, m) block.

Forward iteration (per column; q_0 = 0, beta_0 = 0, q_1 = v / |v|), for j = 1..k:

    w_j   = A q_j - beta_{j-1} q_{j-1}
    a_j   = q_j^T w_j                        (alpha, diagonal of T)
    u_j   = w_j - a_j q_j
    c_j   = Q_j^T u_j,   p_j = u_j - Q_j c_j   (full reorthogonalisation against q_1..q_j)
    b_j   = |p_j|,       q_{j+1} = p_j / b_j  (beta; b_k with q_{k+1} is the residual)

so that A Q = Q T + b_k q_{k+1} e_k^T with T = tridiag(b, a, b).

Adjoint (backward pass). Rather than storing every intermediate of the loop (autodiff), we
treat each line above as a constraint and introduce one Lagrange multiplier per constrained
quantity; requiring stationarity of the Lagrangian with respect to every intermediate gives a
recursion that runs from j = k down to 1 using only the stored Q (m, k+1, n), a, b and the small
reorthogonalisation coefficients c (k, k+1, m). With bars for multipliers (cotangents):

    pbar    = qbar_{j+1} / b_j
    bbar_j += -(qbar_{j+1} . q_{j+1}) / b_j;     pbar += bbar_j q_{j+1}
    ubar    = pbar - Q_j (Q_j^T pbar);            Qbar_j -= pbar c_j^T + u_j (Q_j^T pbar)^T
    abar_j += -(ubar . q_j);                      qbar_j -= a_j ubar
    lam_j   = ubar + abar_j q_j                   (the multiplier of "w_j = A q_j - ...")
    qbar_j += abar_j w_j                          (from a_j = q_j^T w_j)
    qbar_j += A lam_j                             (one matvec per step; A symmetric)
    bbar_{j-1} -= lam_j . q_{j-1};                qbar_{j-1} -= b_{j-1} lam_j

and finally vbar = (qbar_1 - (qbar_1 . q_1) q_1) / |v| + normbar q_1. The parameter gradient is
the sum over steps and columns of d/dtheta (lam_j^T A(theta) q_j); because mv is linear in its
block argument this is *one* vector-Jacobian product of mv on the (n, k*m) block Q with
cotangent Lambda, instead of k separate ones (Kraemer et al., NeurIPS 2024, accumulate the same
sum step by step). Memory is O(n k m) (Q, Qbar, Lambda); no loop intermediates are stored.

Breakdown: when b_j falls below ``breakdown_tol * (|a_j| + b_{j-1})`` an invariant subspace has
been found; q_{j+1} and all later columns are set to zero, later a and b are 0, and everything
stays finite. :func:`tridiag_mask` tells downstream code which entries are alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Tridiag(NamedTuple):
    """Output of :func:`lanczos` for m start vectors and depth k (probe axis first).

    Q: (m, k, n) Lanczos vectors, orthonormal for each of the m processes.
    alpha: (m, k) diagonal of T. beta: (m, k): beta[:, :k-1] the off-diagonal of T and
    beta[:, k-1] the norm of the residual, whose direction is q_next (m, n), so that
    A Q_i^T = Q_i^T T_i + beta[i, k-1] q_next[i] e_k^T for each process i.
    norm: (m,) norms of the start vectors.
    """

    Q: jax.Array
    alpha: jax.Array
    beta: jax.Array
    q_next: jax.Array
    norm: jax.Array


def _safe_norm(x, axis=-1):
    s = jnp.sum(x * x, axis=axis)
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


# Layout note: buffers are (m, k, n) so that the reorthogonalisation is a batched GEMV over
# contiguous rows; a (k, n, m) layout measured 15x slower here. mv works on (n, m) blocks.


# The recursion in pieces, public for callers that supply the products A q_j themselves (as
# :class:`gpadjoint.solve.CGRecursion` is for CG): :mod:`gpadjoint.fused` runs the probes'
# Lanczos steps and a CG solve on one batched product per pass. The state is
# (Qb (m, k+1, n), alpha (m, k), beta (m, k), C (m, k, k+1)): lanczos_start -> lanczos_step for
# j = 0 .. k-1 with Aq = A q_j -> lanczos_finish; lanczos_backward is the adjoint recursion.


def _apply(mv, Vt, args):
    """Apply A to the m row vectors of Vt (m, n)."""
    return mv(Vt.T, *args).T


def lanczos_start(V0, depth):
    """Return the initial state (Qb, alpha, beta, C) and the norms of the start block V0."""
    n, m = V0.shape
    dtype = V0.dtype
    V0 = V0.T
    norm = _safe_norm(V0)
    q1 = V0 / jnp.where(norm > 0, norm, 1.0)[:, None]
    Qb = jnp.zeros((m, depth + 1, n), dtype).at[:, 0].set(q1)
    alpha = jnp.zeros((m, depth), dtype)
    beta = jnp.zeros((m, depth), dtype)
    C = jnp.zeros((m, depth, depth + 1), dtype)
    return (Qb, alpha, beta, C), norm


def lanczos_step(j, state, Aq, breakdown_tol):
    """Lanczos step j given Aq = A q_j (m, n) for the current vectors q_j = state[0][:, j]."""
    Qb, alpha, beta, C = state
    qj = Qb[:, j]
    qprev = jnp.where(j > 0, Qb[:, j - 1], 0.0)
    bprev = jnp.where(j > 0, beta[:, j - 1], 0.0)
    w = Aq - bprev[:, None] * qprev
    a = jnp.sum(qj * w, axis=-1)
    u = w - a[:, None] * qj
    c = jnp.einsum("mkn,mn->mk", Qb, u)  # rows > j of Qb are still zero
    p = u - jnp.einsum("mkn,mk->mn", Qb, c)
    b = _safe_norm(p)
    alive = b > breakdown_tol * (jnp.abs(a) + bprev)
    b = jnp.where(alive, b, 0.0)
    qn = jnp.where(alive[:, None], p / jnp.where(alive, b, 1.0)[:, None], 0.0)
    return (
        Qb.at[:, j + 1].set(qn),
        alpha.at[:, j].set(a),
        beta.at[:, j].set(b),
        C.at[:, j].set(c),
    )


def lanczos_finish(state, norm, depth):
    """Return ``(Tridiag, C)`` from the final state."""
    Qb, alpha, beta, C = state
    return Tridiag(Qb[:, :depth], alpha, beta, Qb[:, depth], norm), C


def _forward(mv, V0, args, depth, breakdown_tol):
    """Run the iteration; return (Tridiag, C) with C (m, k, k+1) the reorth. coefficients."""
    state, norm = lanczos_start(V0, depth)

    def step(j, state):
        return lanczos_step(j, state, _apply(mv, state[0][:, j], args), breakdown_tol)

    return lanczos_finish(lax.fori_loop(0, depth, step, state), norm, depth)


def lanczos_backward(mv, args, out: Tridiag, C, cot: Tridiag, final_vjp: bool = True):
    """Adjoint recursion (see module docstring). Returns cotangents for (V0, *args).

    With ``final_vjp=False`` the parameter VJP is left to the caller (who may fuse it with other
    terms of the same operator): returns (V0 cotangent (n, m), Lambda (m, k, n)).
    """
    m, depth, n = out.Q.shape
    Qb = jnp.concatenate([out.Q, out.q_next[:, None]], axis=1)
    alpha, beta = out.alpha, out.beta
    Qbar = jnp.concatenate([cot.Q, cot.q_next[:, None]], axis=1)
    abar, bbar = cot.alpha, cot.beta
    Lam = jnp.zeros((m, depth, n), Qb.dtype)
    rows = jnp.arange(depth + 1)

    def step(i, state):
        Qbar, abar, bbar, Lam = state
        j = depth - 1 - i
        qj, qn = Qb[:, j], Qb[:, j + 1]
        a, b, c = alpha[:, j, None], beta[:, j, None], C[:, j]
        alive = b > 0
        bsafe = jnp.where(alive, b, 1.0)
        # q_{j+1} = p / b  and  b = |p|
        qnbar = Qbar[:, j + 1]
        pbar = jnp.where(alive, qnbar / bsafe, 0.0)
        bbar_j = bbar[:, j, None] - jnp.where(
            alive, jnp.sum(qnbar * qn, axis=-1, keepdims=True) / bsafe, 0.0
        )
        pbar = pbar + bbar_j * qn
        # p = u - Q_j c,  c = Q_j^T u   (Q_j = rows 0..j)
        # Q_j = rows 0..j of Qb. The mask goes on the small coefficient vectors, never on the
        # (m, k+1, n) buffer: c is already 0 beyond row j (the forward computed it against
        # rows that were still zero), and d is masked explicitly.
        keep = (rows <= j).astype(Qb.dtype)[None, :]
        u = b * qn + jnp.einsum("mkn,mk->mn", Qb, c)
        d = jnp.einsum("mkn,mn->mk", Qb, pbar) * keep
        ubar = pbar - jnp.einsum("mkn,mk->mn", Qb, d)
        Qbar = Qbar - (c[:, :, None] * pbar[:, None] + d[:, :, None] * u[:, None])
        # u = w - a q_j  and  a = q_j^T w
        abar_j = abar[:, j, None] - jnp.sum(ubar * qj, axis=-1, keepdims=True)
        w = u + a * qj
        lam = ubar + abar_j * qj
        qjbar = Qbar[:, j] - a * ubar + abar_j * w + _apply(mv, lam, args)
        # w = A q_j - b_{j-1} q_{j-1}
        qprev = jnp.where(j > 0, Qb[:, j - 1], 0.0)
        bprev = jnp.where(j > 0, beta[:, j - 1, None], 0.0)
        Qbar = Qbar.at[:, j].set(qjbar)
        Qbar = Qbar.at[:, j - 1].add(jnp.where(j > 0, -bprev * lam, 0.0))
        bbar = bbar.at[:, j - 1].add(jnp.where(j > 0, -jnp.sum(lam * qprev, axis=-1), 0.0))
        return (
            Qbar,
            abar.at[:, j].set(abar_j[:, 0]),
            bbar.at[:, j].set(bbar_j[:, 0]),
            Lam.at[:, j].set(lam),
        )

    Qbar, abar, bbar, Lam = lax.fori_loop(0, depth, step, (Qbar, abar, bbar, Lam))
    # q_1 = v / |v|
    q1, norm = Qb[:, 0], out.norm[:, None]
    nsafe = jnp.where(norm > 0, norm, 1.0)
    q1bar = Qbar[:, 0]
    V0bar = (q1bar - jnp.sum(q1bar * q1, axis=-1, keepdims=True) * q1) / nsafe
    V0bar = V0bar + cot.norm[:, None] * q1
    if not final_vjp:
        return V0bar.T, Lam
    # sum_j d/dargs lam_j^T A(args) q_j in ONE vjp over the (n, m*k) block
    Qflat = out.Q.reshape(m * depth, n).T
    Lflat = Lam.reshape(m * depth, n).T
    _, vjp = jax.vjp(lambda *a: mv(Qflat, *a), *args)
    return (V0bar.T, *vjp(Lflat))


def lanczos(
    mv: Callable,
    V0: jax.Array,
    *args,
    depth: int,
    breakdown_tol: float | None = None,
    adjoint: bool = True,
) -> Tridiag:
    """Tridiagonalise A(args) from the m start vectors in V0 (n, m) with depth k steps.

    Args:
        mv: ``mv(V, *args) -> A V`` for V (n,) or (n, m); A symmetric, linear in V.
        V0: start block, shape (n, m) (or (n,), treated as m = 1 and squeezed back).
        *args: the operator's arguments (arrays/pytrees); gradients flow to them.
        depth: number of Lanczos steps k (1 <= k <= n).
        breakdown_tol: relative threshold on beta for declaring an invariant subspace;
            default 100 * machine epsilon of V0's dtype (round-off leaves a residual of a few
            eps * |A| once the Krylov space is exhausted).
        adjoint: use the adjoint custom VJP (default). ``False`` lets JAX differentiate
            through the loop instead (for testing; memory grows with every intermediate).

    Returns:
        :class:`Tridiag`.

    """
    squeeze = V0.ndim == 1
    if squeeze:
        V0 = V0[:, None]
    n = V0.shape[0]
    if not 1 <= depth <= n:
        raise ValueError(f"Lanczos depth must be between 1 and n={n}, got {depth}")
    if breakdown_tol is None:
        breakdown_tol = 100 * float(jnp.finfo(V0.dtype).eps)

    if adjoint:
        out = _lanczos_adjoint(mv, depth, breakdown_tol, V0, *args)
    else:
        out, _ = _forward(mv, V0, args, depth, breakdown_tol)
    if squeeze:
        out = jax.tree.map(lambda x: x[0], out)
    return out


def _lanczos_adjoint(mv, depth, breakdown_tol, V0, *args):
    @jax.custom_vjp
    def run(V0, *args):
        return _forward(mv, V0, args, depth, breakdown_tol)[0]

    def fwd(V0, *args):
        out, C = _forward(mv, V0, args, depth, breakdown_tol)
        return out, (args, out, C)

    def bwd(res, cot):
        args, out, C = res
        return lanczos_backward(mv, args, out, C, cot)

    run.defvjp(fwd, bwd)
    return run(V0, *args)


def tridiag_mask(beta: jax.Array) -> jax.Array:
    """Which rows of T are alive (no breakdown at an earlier step); beta (..., k)."""
    dead = jnp.cumsum((beta == 0).astype(jnp.int32), axis=-1)
    # row j is alive if no breakdown happened at steps < j
    shifted = jnp.concatenate([jnp.zeros_like(dead[..., :1]), dead[..., :-1]], axis=-1)
    return shifted == 0


def tridiag_matrix(alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """Dense T (k, k) from alpha (k,) and beta (k,) (beta[k-1], the residual, is not used)."""
    off = beta[:-1]
    return jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
