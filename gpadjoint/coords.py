"""The coordinates L-BFGS works in, and a Hessian metric that whitens them.

Host functions on :class:`~gpadjoint.kernels.Params`-shaped trees of float64 NumPy arrays:

* :func:`to_opt` / :func:`from_opt` / :func:`opt_grad`: raw (softplus) parameters <-> the
  optimisation coordinates (inverse lengthscales, log output scale, log of the noise above its
  floor, the mean) and the gradient in them;
* :func:`flat` / :func:`unflat`: such a tree <-> one (d + 3,) vector;
* :func:`moved`: how far parameters are from an anchor, as a preconditioner built there sees it;
* :func:`hessian_metric`: M = Q diag(lambda)^-1/2 from a forward-difference Hessian, so that
  in coordinates v with u = u0 + M v the Hessian is about the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np

from .kernels import Params

# The z-scored inputs span a few units: a lengthscale beyond INPUT_RANGE barely changes K
INPUT_RANGE = 3.0
INV_LS_STEP = 1.0  # the most an inverse lengthscale moves in one L-BFGS step
_MIN_INV_LS = 1e-12


def positive(raw) -> np.ndarray:
    """softplus(raw) in float64."""
    return np.logaddexp(np.asarray(raw, np.float64), 0.0)


def softplus_inv(y) -> np.ndarray:
    """Inverse of :func:`positive` for y > 0."""
    y = np.asarray(y, np.float64)
    return y + np.log(-np.expm1(-y))


def to_opt(p: Params) -> Params:
    """Raw parameters -> the L-BFGS coordinates (1/lengthscale, log scales, the mean).

    The coordinates: 1/lengthscale, log output scale, log(noise - floor), the mean. Log
    coordinates for the scales: a value of 0.7 or of 200 is a few units away, not 200
    softplus units (elevators, 300 rows, exact loss: 96 evaluations to |g| 1e-5 instead of 221
    to 3e-4). The *inverse* lengthscale for each input: the kernel depends on x / l, so a weak
    input's lengthscale falling from 400 to 100 is a move of 0.0075 there and an unimportant
    input sits at 0, a regular point (the loss is even in 1/l), where in log l it is a long
    walk down a slope whose gradient vanishes like 1/l^2 (the full elevators fit crawled along
    that at ~1e-5 nats per step while the fixed-probe objective was still 4e-3 above its value
    at the exact optimum).
    """
    return Params(1.0 / positive(p.raw_lengthscale), np.log(positive(p.raw_outputscale)),
                  np.log(positive(p.raw_noise)), np.asarray(p.mean, np.float64))


def from_opt(u: Params) -> Params:
    """Inverse of :func:`to_opt` (an inverse lengthscale's sign does not matter)."""
    inv = np.maximum(np.abs(np.asarray(u.raw_lengthscale, np.float64)), _MIN_INV_LS)
    return Params(softplus_inv(1.0 / inv), softplus_inv(np.exp(u.raw_outputscale)),
                  softplus_inv(np.exp(u.raw_noise)), np.asarray(u.mean, np.float64))


def opt_grad(g: Params, p: Params) -> Params:
    """Gradient in :func:`to_opt` coordinates from the raw gradient ``g`` at ``p``."""

    def dlog(gr, r):  # d raw / d log y = y / sigmoid(raw) with y = softplus(raw)
        y = positive(r)
        return np.asarray(gr, np.float64) * y / -np.expm1(-y)

    ls = positive(p.raw_lengthscale)  # d raw / d (1/l) = -l^2 / sigmoid(raw)
    g_inv = np.asarray(g.raw_lengthscale, np.float64) * -ls * ls / -np.expm1(-ls)
    return Params(g_inv, dlog(g.raw_outputscale, p.raw_outputscale),
                  dlog(g.raw_noise, p.raw_noise), np.asarray(g.mean, np.float64))


def moved(p: Params, anchor: Params) -> float:
    """Return how far ``p`` is from ``anchor``, as the preconditioner sees it.

    The largest change of a log scale, a lengthscale's weighted by min(1, INPUT_RANGE / l): a
    lengthscale far beyond the inputs' range changes K, and so the preconditioner's quality,
    very little.
    """
    la, lb = positive(p.raw_lengthscale), positive(anchor.raw_lengthscale)
    w = np.minimum(1.0, INPUT_RANGE / np.minimum(la, lb))
    moves = [np.abs(np.log(la) - np.log(lb)) * w,
             np.abs(np.log(positive(p.raw_outputscale)) - np.log(positive(
                 anchor.raw_outputscale))),
             np.abs(np.log(positive(p.raw_noise)) - np.log(positive(anchor.raw_noise)))]
    return float(max(np.max(m) for m in moves))


def flat(p: Params) -> np.ndarray:
    """[lengthscale part (d), output scale, noise, mean] of a Params-shaped tree, one vector."""
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in p])


def unflat(vec, like: Params) -> Params:
    """Inverse of :func:`flat`, shaped like ``like``."""
    d = np.size(like.raw_lengthscale)
    vec = np.asarray(vec, np.float64)
    return Params(vec[:d], vec[d], vec[d + 1], vec[d + 2])


def tree_vdot(a, b) -> float:
    """Sum of the leafwise dot products of two trees of the same structure."""
    return float(sum(np.vdot(np.asarray(x), np.asarray(z)) for x, z in zip(
        jax.tree.leaves(a), jax.tree.leaves(b))))


def tree_norm(a) -> float:
    """2-norm of all of a tree's entries."""
    return math.sqrt(tree_vdot(a, a))


def tree_finite(a) -> bool:
    """Whether every entry of a tree is finite."""
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(a))


def hessian_metric(grad: Callable[[np.ndarray], np.ndarray], x0, *, step: float = 1e-5,
                   floor: float = 1e-4,
                   record: Callable[[np.ndarray, np.ndarray], None] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(M, eigenvalues): M M^T inverts the Hessian of a function at ``x0`` (made positive).

    ``grad`` maps a (k,) point to the (k,) gradient there; the Hessian is its forward
    difference with ``step`` (k + 1 evaluations, each passed to ``record(x, g)`` when given),
    symmetrised. Its eigenvalues are replaced by their absolute values, floored at ``floor``
    times the largest, and M = Q diag(lambda)^-1/2: in coordinates v with x = x0 + M v the
    Hessian is the identity on the directions above the floor, so the first L-BFGS step there
    is a Newton step. The eigenvalues returned are the raw ones (signed, unfloored).
    """
    x0 = np.asarray(x0, np.float64)
    g0 = np.asarray(grad(x0), np.float64)
    if record is not None:
        record(x0, g0)
    H = np.empty((x0.size, x0.size))
    for j in range(x0.size):
        x = x0.copy()
        x[j] += step
        g = np.asarray(grad(x), np.float64)
        if record is not None:
            record(x, g)
        H[:, j] = (g - g0) / step
    lam, Q = np.linalg.eigh(0.5 * (H + H.T))
    top = max(float(np.max(np.abs(lam))), 1e-300)
    return Q / np.sqrt(np.maximum(np.abs(lam), floor * top)), lam
