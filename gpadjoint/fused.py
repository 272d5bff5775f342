r"""SLQ log det and the CG solve sharing one kernel pass per step, with one fused gradient.

Data flow: lanczos + solve -> **fused** -> mll. The log-marginal likelihood needs p Lanczos
processes (one per probe, for SLQ) and one CG solve K x = y - mu. Run separately they cost
``depth`` passes over the n^2 kernel pairs plus one per CG iteration; here every pass
evaluates K on the block ``[q_j^(1) .. q_j^(p) | CG direction]`` at once, so the solve rides on
the Lanczos passes. A batched kernel product costs little more than a single one on KeOps (the
pairwise kernel values are shared by all columns), so CG becomes almost free until it needs
more iterations than the Lanczos depth; those extra iterations run alone afterwards.

The backward pass is the Lanczos adjoint of :mod:`gpadjoint.lanczos` (``depth`` more passes),
and the parameter gradient of *both* terms,

    sum_{j, i} d/dtheta (lam_j^(i)T K(theta) q_j^(i))  -  g * x^T (dK/dtheta) x,

is one vector-Jacobian product of the matvec over the block ``[Q | x]`` with cotangent
``[Lambda | -g x]``: one reduction instead of two. Total: max(depth, CG passes) + depth + 1
passes per value and gradient (the dense backend adds the build of K).

With ``half = (U, c, scale)`` the Lanczos processes run on S K S, S = P^{-1/2} the
preconditioner's inverse square root (:func:`gpadjoint.logdet.half_inverse`); S is symmetric and
carries no gradient, so the fused VJP takes ``[S Q | x]`` with cotangent ``[S Lambda | -g x]``.

The values and gradients are those of :func:`gpadjoint.logdet.slq_logdet` (or its preconditioned
form) and :func:`gpadjoint.solve.inv_quad` run one after the other (``tests/test_fused.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from .lanczos import lanczos_backward, lanczos_finish, lanczos_start, lanczos_step
from .logdet import half_inverse
from .solve import CGInfo, CGRecursion, Preconditioner

logger = logging.getLogger("gpadjoint")
# While the "gpadjoint" logger is enabled for DEBUG when a solve is traced, its CG loop reports
# its iteration and residual to the host every PROGRESS_EVERY iterations (a DEBUG record with
# ``extra={"evaluation": {"kind": "cg_progress", ...}}``), so that an evaluation too long to
# finish still says how far its solve got. Otherwise nothing is added to the compiled loop.
PROGRESS_EVERY = 25


def _report_cg(n, it, res):
    it, res = int(it), float(res)
    logger.debug("CG iteration %d (n = %d): relative residual %.2e", it, n, res,
                 extra={"evaluation": {"kind": "cg_progress", "n": n, "iteration": it,
                                       "residual": res, "wall": time.time()}})


def _with_progress(st, n: int):
    """Return ``st`` (a CGState), reporting it to the host every PROGRESS_EVERY iterations."""
    if not logger.isEnabledFor(logging.DEBUG):  # decided when traced
        return st

    def report(st):
        jax.debug.callback(lambda it, res: _report_cg(n, it, res), st.it, jnp.max(st.res))
        return st

    return lax.cond(st.it % PROGRESS_EVERY == 0, report, lambda st: st, st)


def slq_and_solve(
    mv: Callable,
    probes: jax.Array,
    b: jax.Array,
    *args,
    depth: int,
    precond: Preconditioner | None = None,
    tol: float = 1e-2,
    min_iter: int = 0,
    max_iter: int = 1000,
    x0: jax.Array | None = None,
    half: tuple | None = None,
    breakdown_tol: float | None = None,
    cg_cap: jax.Array | None = None,
):
    """Lanczos on every probe and CG on b, sharing passes; differentiable w.r.t. ``args``, ``b``.

    Args:
        mv: operator ``mv(V, *args) = A V`` for V (n, m), A symmetric positive definite.
        probes: (n, p) start block of the Lanczos processes.
        b: (n,) right-hand side of the solve.
        *args: the operator's arguments (receive gradients).
        depth: Lanczos depth k.
        precond: CG preconditioner (no gradient).
        tol: CG stops when |b - A x| / |b| <= tol ...
        min_iter: ... and at least this many iterations ran ...
        max_iter: ... or after this many (as :func:`gpadjoint.solve.cg`).
        x0: warm start of CG (its product with A shares the first pass).
        half: optional factors (U, c, scale) of S = P^{-1/2}: Lanczos runs on S A S.
        breakdown_tol: as :func:`gpadjoint.lanczos.lanczos`.
        cg_cap: optional traced bound on the CG iterations, below ``max_iter`` (a float scalar
            array, so that it varies between calls without a new compilation): a line
            search's trial point that would need far more iterations than the accepted point
            is abandoned early instead of running to ``max_iter``.

    Returns:
        (tri, quad, x, info, passes): the :class:`~gpadjoint.lanczos.Tridiag` (gradients reach
        ``args`` through its alpha, beta and norm), b^T x, x ~= A^-1 b (no gradient), the
        :class:`~gpadjoint.solve.CGInfo` and the number of forward passes taken (an int array).

    """
    n, _ = probes.shape
    if not 1 <= depth <= n:
        raise ValueError(f"Lanczos depth must be between 1 and n={n}, got {depth}")
    if breakdown_tol is None:
        breakdown_tol = 100 * float(jnp.finfo(probes.dtype).eps)
    run = _fused(mv, depth, breakdown_tol, (tol, min_iter, max_iter))
    tri, quad, x, it, res = run(probes, b, (precond, x0, half, cg_cap), *args)
    x = lax.stop_gradient(x)
    it = lax.stop_gradient(it)
    passes = jnp.maximum(depth, it + (0 if x0 is None else 1))
    return tri, quad, x, CGInfo(it, lax.stop_gradient(res)), passes


def _sym(half):
    if half is None:
        return lambda V: V
    return lambda V: half_inverse(V, *half)


def _forward(mv, depth, breakdown_tol, cg_cfg, V0, b, consts, args):
    precond, x0, half, cap = consts
    S = _sym(half)
    m = V0.shape[1]
    tol, min_iter, max_iter = cg_cfg
    if cap is not None:
        max_iter = jnp.minimum(max_iter, cap.astype(jnp.int32))
    state, norm = lanczos_start(V0, depth)
    rec = CGRecursion(b[:, None], precond, tol=tol, min_iter=min_iter, max_iter=max_iter)

    def maybe_update(st, AP):
        new = rec.update(st, AP)
        go = rec.cond(st)
        return jax.tree.map(lambda a, c: jnp.where(go, a, c), new, st)

    # pass 0: the first Lanczos vectors with either the first CG direction or the warm start
    if x0 is None:
        st = rec.start()
        W = mv(jnp.concatenate([S(state[0][:, 0].T), st.P], axis=1), *args)
        st = maybe_update(st, W[:, m:])
    else:
        W = mv(jnp.concatenate([S(state[0][:, 0].T), x0[:, None]], axis=1), *args)
        st = rec.start(x0[:, None], W[:, m:])
    state = lanczos_step(0, state, S(W[:, :m]).T, breakdown_tol)

    def body(j, carry):
        state, st = carry
        W = mv(jnp.concatenate([S(state[0][:, j].T), st.P], axis=1), *args)
        return lanczos_step(j, state, S(W[:, :m]).T, breakdown_tol), maybe_update(st, W[:, m:])

    state, st = lax.fori_loop(1, depth, body, (state, st))
    # CG iterations beyond the Lanczos depth run alone
    n = b.shape[0]
    st = lax.while_loop(rec.cond,
                        lambda s: _with_progress(rec.update(s, mv(s.P, *args)), n), st)
    tri, C = lanczos_finish(state, norm, depth)
    x = st.X[:, 0]
    return (tri, jnp.dot(b, x), x, st.it, st.res), C


def _fused(mv, depth, breakdown_tol, cg_cfg):
    @jax.custom_vjp
    def run(V0, b, consts, *args):
        return _forward(mv, depth, breakdown_tol, cg_cfg, V0, b, consts, args)[0]

    def fwd(V0, b, consts, *args):
        out, C = _forward(mv, depth, breakdown_tol, cg_cfg, V0, b, consts, args)
        return out, (args, consts, out[0], out[2], C)

    def bwd(res, cot):
        args, consts, tri, x, C = res
        half = consts[2]
        S = _sym(half)
        cot_tri, g = cot[0], cot[1]

        def mv_lanczos(V, *a):
            return S(mv(S(V), *a))

        V0bar, Lam = lanczos_backward(mv_lanczos, args, tri, C, cot_tri, final_vjp=False)
        m, k, n = tri.Q.shape
        U = jnp.concatenate([S(tri.Q.reshape(m * k, n).T), x[:, None]], axis=1)
        Wbar = jnp.concatenate([S(Lam.reshape(m * k, n).T), -g * x[:, None]], axis=1)
        _, vjp = jax.vjp(lambda *a: mv(U, *a), *args)
        zeros = jax.tree.map(jnp.zeros_like, consts)
        return (V0bar, 2.0 * g * x, zeros, *vjp(Wbar))

    run.defvjp(fwd, bwd)
    return run
