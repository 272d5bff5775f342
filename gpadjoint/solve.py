r"""Linear solves with A = K(theta): pivoted-Cholesky-preconditioned CG and its implicit VJP.

Data flow: lanczos -> logdet / **solve** -> mll. Like :mod:`gpadjoint.lanczos` this module only
sees an operator ``mv(V, *args) = A V``; kernel specifics come in as plain functions.

* :func:`pivoted_cholesky` builds a rank-r factor L of the noise-free kernel matrix from r rows
  (O(n r) memory, r row evaluations); P = L L^T + sigma2 I is the preconditioner, applied by
  the Woodbury identity in O(n r). Its pivots are either greedy (the largest residual
  diagonal entry) or random (drawn with probability proportional to the residual diagonal:
  randomly pivoted Cholesky, Chen, Epperly, Tropp and Webber 2023). Greedy pivoting keeps
  picking isolated points whose rows explain little else; random pivots cover where the mass
  of the residual is, leaving a smaller trace tr(K - L L^T) at the same rank and so fewer CG
  iterations (results/precond_pivot.csv).
* :func:`cg` runs preconditioned conjugate gradients on a block of right-hand sides, each column
  with its own step sizes, until every column's relative residual |r|/|b| <= tol (at least
  ``min_iter``, at most ``max_iter`` iterations).
* :func:`inv_quad` returns b^T A^{-1} b with the *implicit* backward pass
  d(b^T A^{-1} b) = 2 x^T db - x^T dA x, x = A^{-1} b: no differentiation through CG iterations
  and no second solve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class CGConvergenceWarning(RuntimeWarning):
    """CG stopped at its iteration cap before reaching its tolerance (training or prediction).

    The message says which solve, the residual reached and what to raise.
    """


class Preconditioner(NamedTuple):
    """P = L L^T + shift * I (L: (n, r)), with the Cholesky factor of I*shift + L^T L."""

    L: jax.Array
    shift: jax.Array
    chol_small: jax.Array

    def solve(self, V):
        """P^{-1} V for V (n,) or (n, m), by Woodbury."""
        LtV = self.L.T @ V
        z = jax.scipy.linalg.cho_solve((self.chol_small, True), LtV)
        return (V - self.L @ z) / self.shift


def pivoted_cholesky(row_fn: Callable, diag: jax.Array, rank: int,
                     key: jax.Array | None = None) -> jax.Array:
    """Partial pivoted Cholesky of a PSD matrix known through its rows and diagonal.

    Args:
        row_fn: ``row_fn(i) -> (n,)`` row i of the matrix (traced index).
        diag: (n,) its diagonal.
        rank: number of pivots r (0 gives an (n, 0) factor).
        key: None for greedy pivots (the largest residual diagonal entry); a PRNG key for
            random ones, pivot k drawn from ``fold_in(key, k)`` with probability proportional
            to the residual diagonal (randomly pivoted Cholesky). Either way the factor is
            exact on its pivots' rows and columns.

    Returns:
        L (n, r) with L L^T approximating the matrix; exact on the pivoted rows/columns.
        Pivoting stops (later columns are 0) once the remaining diagonal is ~0.

    """
    n = diag.shape[0]
    dtype = diag.dtype
    L = jnp.zeros((n, rank), dtype)
    if rank == 0:
        return L
    tiny = 100 * jnp.finfo(dtype).eps * jnp.max(diag)

    def pivot(k, d):
        if key is None:
            return jnp.argmax(d)
        # a spent pivot (d = 0) has probability 0; an all-spent d falls back to greedy below
        logits = jnp.where(d > tiny, jnp.log(jnp.where(d > tiny, d, 1.0)), -jnp.inf)
        drawn = jax.random.categorical(jax.random.fold_in(key, k), logits)
        return jnp.where(jnp.any(d > tiny), drawn, jnp.argmax(d))

    def body(k, state):
        L, d = state
        i = pivot(k, d)
        piv = d[i]
        ok = piv > tiny
        row = row_fn(i) - L @ L[i]
        col = jnp.where(ok, row / jnp.sqrt(jnp.where(ok, piv, 1.0)), 0.0)
        L = L.at[:, k].set(col)
        d = jnp.maximum(d - col * col, 0.0)
        d = d.at[i].set(0.0)
        return L, d

    L, _ = lax.fori_loop(0, rank, body, (L, diag))
    return L


def make_preconditioner(L: jax.Array, shift) -> Preconditioner:
    """Preconditioner P = L L^T + shift I; everything here is excluded from differentiation."""
    L = lax.stop_gradient(L)
    shift = lax.stop_gradient(jnp.asarray(shift, L.dtype))
    r = L.shape[1]
    small = shift * jnp.eye(r, dtype=L.dtype) + L.T @ L
    return Preconditioner(L, shift, jnp.linalg.cholesky(small))


class CGInfo(NamedTuple):
    """Diagnostics of one CG run: iterations taken and final relative residual per column."""

    iterations: jax.Array
    residual: jax.Array


class CGState(NamedTuple):
    """State of preconditioned CG, one recursion per column.

    Iteration count, iterate, residual, search direction, r^T P^-1 r, relative residual norms.
    """

    it: jax.Array
    X: jax.Array
    R: jax.Array
    P: jax.Array
    rz: jax.Array
    res: jax.Array


class CGRecursion:
    """The CG recursion with its matvecs supplied by the caller.

    :func:`cg` drives it with its own products; :mod:`gpadjoint.fused` feeds it the column it
    appends to each Lanczos block, so that the solve costs no pass of its own.
    """

    def __init__(self, B, precond=None, *, tol, min_iter, max_iter):
        self.Pinv = (lambda V: V) if precond is None else precond.solve
        bnorm = jnp.linalg.norm(B, axis=0)
        self.bsafe = jnp.where(bnorm > 0, bnorm, 1.0)
        self.B, self.tol, self.min_iter, self.max_iter = B, tol, min_iter, max_iter
        self.tiny = jnp.finfo(B.dtype).tiny

    def _relres(self, R):
        return jnp.linalg.norm(R, axis=0) / self.bsafe

    def start(self, x0=None, Ax0=None) -> CGState:
        """Return the initial state from a warm start x0 and A x0 (both None: x0 = 0)."""
        X = jnp.zeros_like(self.B) if x0 is None else x0
        R = self.B if x0 is None else self.B - Ax0
        Z = self.Pinv(R)
        it = jnp.asarray(0)
        return CGState(it, X, R, Z, jnp.sum(R * Z, axis=0), self._relres(R))

    def cond(self, st: CGState):
        """Return True while another iteration is due."""
        return (st.it < self.max_iter) & ((st.it < self.min_iter) | jnp.any(st.res > self.tol))

    def update(self, st: CGState, AP) -> CGState:
        """One iteration, given AP = A @ st.P."""
        tiny = self.tiny
        pap = jnp.sum(st.P * AP, axis=0)
        active = st.res > self.tol if self.min_iter == 0 else jnp.ones_like(st.res, bool)
        active = active | (st.it < self.min_iter)
        step = jnp.where(active & (pap > tiny), st.rz / jnp.where(pap > tiny, pap, 1.0), 0.0)
        X = st.X + step * st.P
        R = st.R - step * AP
        Z = self.Pinv(R)
        rz_new = jnp.sum(R * Z, axis=0)
        beta = jnp.where(st.rz > tiny, rz_new / jnp.where(st.rz > tiny, st.rz, 1.0), 0.0)
        return CGState(st.it + 1, X, R, Z + beta * st.P, rz_new, self._relres(R))


def cg(
    mv: Callable,
    B: jax.Array,
    *args,
    precond: Preconditioner | None = None,
    tol: float = 1e-2,
    min_iter: int = 0,
    max_iter: int = 1000,
    x0: jax.Array | None = None,
) -> tuple[jax.Array, CGInfo]:
    """Solve A X = B by preconditioned CG, one independent recursion per column of B.

    Stops when every column has |B - A X| / |B| <= tol and at least ``min_iter`` iterations
    ran, or after ``max_iter``. Not differentiable (use :func:`inv_quad` for gradients).
    """
    squeeze = B.ndim == 1
    if squeeze:
        B = B[:, None]
        x0 = None if x0 is None else x0[:, None]
    rec = CGRecursion(B, precond, tol=tol, min_iter=min_iter, max_iter=max_iter)
    state = rec.start(x0, None if x0 is None else mv(x0, *args))
    state = lax.while_loop(rec.cond, lambda st: rec.update(st, mv(st.P, *args)), state)
    it, X, _, _, _, res = state
    if squeeze:
        X = X[:, 0]
    return X, CGInfo(it, res)


def inv_quad(
    mv: Callable, b: jax.Array, *args, solver: Callable, solver_args=()
) -> tuple[jax.Array, jax.Array, CGInfo]:
    """b^T A(args)^{-1} b for b (n,), with an implicit (solve-free) backward pass.

    Args:
        mv: operator ``mv(V, *args) = A V``.
        b: right-hand side (n,).
        *args: operator arguments (receive gradients).
        solver: ``solver(mv, b, args, solver_args) -> (x, CGInfo)`` returning x ~= A^{-1} b.
        solver_args: arrays the solver needs (preconditioner, warm start); not differentiated.
            They are explicit arguments, not closures, because a custom VJP may not close over
            traced values.

    Returns:
        (value, x, info). ``x`` is returned without gradient (``stop_gradient``).

    """

    @jax.custom_vjp
    def quad(b, solver_args, *args):
        x, info = solver(mv, b, args, solver_args)
        return jnp.dot(b, x), (x, info)

    def fwd(b, solver_args, *args):
        x, info = solver(mv, b, args, solver_args)
        return (jnp.dot(b, x), (x, info)), (x, solver_args, args)

    def bwd(res, cot):
        x, solver_args, args = res
        g = cot[0]
        # d(b^T A^-1 b) = 2 x^T db - x^T dA x
        _, vjp = jax.vjp(lambda *a: mv(x, *a), *args)
        zeros = jax.tree.map(jnp.zeros_like, solver_args)
        return (2.0 * g * x, zeros, *vjp(-g * x))

    quad.defvjp(fwd, bwd)
    value, (x, info) = quad(b, solver_args, *args)
    return value, lax.stop_gradient(x), jax.tree.map(lax.stop_gradient, info)
