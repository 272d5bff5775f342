"""L-BFGS as pure host functions: the two-loop direction, the step cap, a weak-Wolfe search.

Nothing here knows of Gaussian processes: vectors are flat float64 NumPy arrays and the
objective is a callable. :mod:`gpadjoint.optimizers` builds the GP trainer from these pieces
(its coordinates, evaluations and preconditioner refreshes); the tests run them on a quadratic
and on Rosenbrock's function.

* :func:`init_memory` / :func:`direction`: the L-BFGS inverse-Hessian product H g from the last
  ``m`` curvature pairs (Nocedal and Wright's two-loop recursion), with the initial scale
  gamma = s^T y / y^T y of the newest pair, or min(1, 1/|g|) before any pair exists.
  :class:`Memory` has the layout of ``optax.scale_by_lbfgs``'s state, so checkpoints written
  before this module existed still load.
* :func:`step_cap`: the longest step along a direction that moves no block of coordinates by
  more than its cap.
* :func:`weak_wolfe`: a line search that starts at t = min(1, cap), shrinks by safeguarded
  quadratic interpolation, grows by doubling, and stops at the first point that satisfies the
  sufficient-decrease (Armijo) and weak curvature conditions. It asks ``stop()`` before each
  evaluation, so a caller can abandon the search between evaluations.
* :func:`minimize`: the host loop over those three for a plain ``fun(x) -> (value, grad)``
  (the reference fit in ``scripts/exact_optimum.py``; the GP trainer runs its own loop, since
  its evaluations carry CG state and preconditioner refreshes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np


class Memory(NamedTuple):
    """The curvature memory of L-BFGS (k coordinates, m pairs).

    count: int32 scalar, directions computed so far (0: no pair yet).
    params: (k,) the point of the last direction.
    updates: (k,) the gradient there.
    diff_params_memory: (m, k) s_i = x_{i+1} - x_i, ring buffer.
    diff_updates_memory: (m, k) y_i = g_{i+1} - g_i.
    weights_memory: (m,) rho_i = 1 / (y_i^T s_i) (0 for an empty or degenerate slot).
    """

    count: Any
    params: Any
    updates: Any
    diff_params_memory: Any
    diff_updates_memory: Any
    weights_memory: Any


def init_memory(k: int, m: int) -> Memory:
    """Return an empty memory for ``k`` coordinates and ``m`` curvature pairs."""
    if m < 1:
        raise ValueError(f"L-BFGS memory size must be >= 1, got {m}")
    return Memory(np.int32(0), np.zeros(k), np.zeros(k), np.zeros((m, k)), np.zeros((m, k)),
                  np.zeros(m))


def direction(g, memory: Memory, x) -> tuple[np.ndarray, Memory]:
    """Return ``(H g, memory)``: the inverse-Hessian product at point ``x`` with gradient ``g``.

    The pair (x - previous x, g - previous g) enters the memory first (skipped on the first
    call); the descent direction is ``-H g``. Pure: the memory passed in is not changed, so
    calling this at a trial point (for the predicted decrease g^T H g / 2, say) costs nothing.
    """
    g, x = np.asarray(g, np.float64), np.asarray(x, np.float64)
    count = int(memory.count)
    dp_mem = np.array(memory.diff_params_memory, np.float64)
    du_mem = np.array(memory.diff_updates_memory, np.float64)
    w_mem = np.array(memory.weights_memory, np.float64)
    m = w_mem.shape[0]
    if count > 0:
        dp = x - np.asarray(memory.params, np.float64)
        du = g - np.asarray(memory.updates, np.float64)
        sy = float(du @ dp)
        weight = 0.0 if sy == 0.0 else 1.0 / sy
        yy = float(du @ du)
        gamma = sy / yy if yy > 0.0 else 1.0
    else:
        dp, du, weight = np.zeros_like(x), np.zeros_like(g), 0.0
        norm = float(np.linalg.norm(g))  # the first step is at most 1 long
        gamma = 1.0 if norm <= 1.0 else 1.0 / norm
    prev = (count - 1) % m
    dp_mem[prev], du_mem[prev], w_mem[prev] = dp, du, weight
    hg = two_loop(g, dp_mem, du_mem, w_mem, gamma, newest_next=count % m)
    return hg, Memory(np.int32(count + 1), x, g, dp_mem, du_mem, w_mem)


def two_loop(g, s_mem, y_mem, rho, gamma: float, newest_next: int = 0) -> np.ndarray:
    """H g by the two-loop recursion over the ring buffers ``s_mem``, ``y_mem`` (m, k).

    ``newest_next`` is the slot the next pair will take, so the oldest pair sits there and the
    newest just before it; ``gamma`` scales the identity that H starts from. Empty slots
    (rho = 0) contribute nothing.
    """
    m = len(rho)
    order = [(newest_next + i) % m for i in range(m)]  # oldest first
    q = np.array(g, np.float64)
    alphas = {}
    for i in reversed(order):
        alphas[i] = rho[i] * float(s_mem[i] @ q)
        q = q - alphas[i] * y_mem[i]
    r = gamma * q
    for i in order:
        beta = rho[i] * float(y_mem[i] @ r)
        r = r + (alphas[i] - beta) * s_mem[i]
    return r


def step_cap(desc: Sequence, caps: Sequence[float]) -> float:
    """Longest t such that no block ``desc[i] * t`` moves any entry by more than ``caps[i]``."""
    return min(float(c / max(np.max(np.abs(np.asarray(a))), 1e-30)) for c, a in zip(caps, desc))


class Trial(NamedTuple):
    """One evaluation of the line search at step length t.

    ok: the value can be trusted (finite, and whatever else the caller requires).
    value: the objective there.
    slope: its derivative along the search direction (needed only when ``ok``).
    payload: anything the caller wants back with the accepted point (parameters, gradient).
    """

    ok: bool
    value: float
    slope: float
    payload: Any = None


class Search(NamedTuple):
    """Outcome of :func:`weak_wolfe`.

    t: the accepted step (0 when none was accepted); trial: its :class:`Trial` (None when none);
    wolfe: both conditions hold there (else only sufficient decrease: the cap was reached or the
    evaluations ran out); evaluations: how many were made; interrupted: ``stop()`` ended it.
    """

    t: float
    trial: Trial | None
    wolfe: bool
    evaluations: int
    interrupted: bool


def weak_wolfe(phi: Callable[[float], Trial], value: float, slope: float, *, t_max: float,
               c1: float = 1e-4, c2: float = 0.9, max_evals: int = 10,
               stop: Callable[[], bool] | None = None) -> Search:
    """Search t in (0, t_max] along a descent direction: phi(t) evaluates the point x + t d.

    ``value`` and ``slope`` (< 0) are the objective and its directional derivative at t = 0.
    A trial that is not ``ok`` or fails sufficient decrease (value > value + c1 t slope) is too
    long: the next t minimises the quadratic through (0, value, slope) and (t, phi(t)), kept in
    [lo + 0.1 (hi - lo), lo + 0.5 (hi - lo)]. A trial with sufficient decrease whose slope is
    still below c2 * slope is too short: t doubles (up to t_max) until a too-long point is
    known, then bisects. The best point with sufficient decrease is returned even when the
    curvature condition never held; ``stop()`` is asked before each evaluation.
    """
    t, lo, hi = min(1.0, t_max), 0.0, math.inf
    best, best_t, wolfe, evals = None, 0.0, False, 0
    for _ in range(max_evals):
        if stop is not None and stop():
            return Search(best_t, best, False, evals, True)
        trial = phi(t)
        evals += 1
        if not trial.ok or trial.value > value + c1 * t * slope:
            hi = t
            if trial.ok:
                denom = 2.0 * (trial.value - value - slope * t)
                t_q = -slope * t * t / denom if denom > 0 else 0.5 * (lo + hi)
            else:
                t_q = lo + 0.25 * (hi - lo)
            t = min(max(t_q, lo + 0.1 * (hi - lo)), lo + 0.5 * (hi - lo))
            continue
        best, best_t = trial, t
        if trial.slope >= c2 * slope:
            wolfe = True
            break
        if t >= t_max:
            break  # as long as allowed: take it
        lo = t
        t = min(2.0 * t, t_max) if math.isinf(hi) else 0.5 * (lo + hi)
    return Search(best_t, best, wolfe, evals, False)


class Result(NamedTuple):
    """Outcome of :func:`minimize`.

    x, value, grad: the last accepted point (the start if no step was taken), its objective and
    gradient; converged: ``done`` held there; iterations: accepted steps; evaluations: calls
    of ``fun`` (the start's included when it was evaluated here); message: why it stopped;
    interrupted: ``stop()`` ended it.
    """

    x: np.ndarray
    value: float
    grad: np.ndarray
    converged: bool
    iterations: int
    evaluations: int
    message: str
    interrupted: bool = False


def minimize(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0, *,
             value0: float | None = None, grad0=None, gtol: float = 1e-6,
             done: Callable[[np.ndarray, float, np.ndarray], bool] | None = None,
             memory_size: int = 10, max_iter: int = 1000, max_evals: int = 20,
             c1: float = 1e-4, c2: float = 0.9,
             max_step: Callable[[np.ndarray, np.ndarray], float] | None = None,
             stop: Callable[[], bool] | None = None) -> Result:
    """Minimise ``fun`` from ``x0`` by L-BFGS: :func:`direction` and :func:`weak_wolfe`.

    ``fun(x) -> (value, grad)`` on flat float64 vectors; a non-finite value or gradient marks a
    point the search must step back from. ``value0``/``grad0``: the objective at ``x0`` when
    already known (not evaluated again). It stops when ``done(x, value, grad)`` holds at the
    start or an accepted point (default: |grad|_2 <= ``gtol``), when a line search finds no
    point of sufficient decrease within ``max_evals`` evaluations (or only one no lower than
    the start: the decrease is below round-off), after ``max_iter`` steps, or
    when ``stop()`` is true before an evaluation. ``max_step(x, d)``: the longest step allowed
    along d (:func:`step_cap`; default unbounded). A direction that is not downhill (round-off
    in the memory) restarts from the gradient scaled to length <= 1; a step without a positive
    curvature pair clears the memory.
    """
    x = np.array(x0, np.float64)
    evals = 0
    if value0 is None or grad0 is None:
        value0, grad0 = fun(x)
        evals = 1
    value, g = float(value0), np.asarray(grad0, np.float64)
    if not (math.isfinite(value) and np.all(np.isfinite(g))):
        raise ValueError(f"minimize: the objective at x0 is not finite (value {value}); "
                         "start from a point where it is")
    done = done or (lambda _x, _v, gr: float(np.linalg.norm(gr)) <= gtol)
    memory = init_memory(x.size, memory_size)
    for it in range(max_iter):
        if done(x, value, g):
            return Result(x, value, g, True, it, evals, "converged")
        hg, new_memory = direction(g, memory, x)
        d, slope = -hg, -float(g @ hg)
        if not (math.isfinite(slope) and slope < 0):  # lost descent: restart from the gradient
            new_memory = init_memory(x.size, memory_size)
            d = -min(1.0, 1.0 / max(float(np.linalg.norm(g)), 1e-300)) * g
            slope = float(g @ d)

        def phi(t, x=x, d=d):
            xt = x + t * d
            vt, gt = fun(xt)
            gt = np.asarray(gt, np.float64)
            ok = math.isfinite(vt) and bool(np.all(np.isfinite(gt)))
            return Trial(ok, float(vt), float(gt @ d) if ok else math.nan, (xt, gt))

        t_max = math.inf if max_step is None else max_step(x, d)
        search = weak_wolfe(phi, value, slope, t_max=t_max, c1=c1, c2=c2, max_evals=max_evals,
                            stop=stop)
        evals += search.evaluations
        if search.trial is None or not search.trial.value < value:  # none, or round-off
            why = "interrupted" if search.interrupted else (
                f"the line search found no lower point in {search.evaluations} evaluations")
            return Result(x, value, g, False, it, evals, why, search.interrupted)
        if not (search.wolfe or search.t * (search.trial.slope - slope) > 0):
            new_memory = init_memory(x.size, memory_size)  # no positive curvature pair
        memory, (x, g), value = new_memory, search.trial.payload, search.trial.value
        if search.interrupted:
            return Result(x, value, g, done(x, value, g), it + 1, evals, "interrupted", True)
    converged = done(x, value, g)
    return Result(x, value, g, converged, max_iter, evals,
                  "converged" if converged else f"max_iter = {max_iter} steps")
