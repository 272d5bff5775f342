"""The pure L-BFGS parts (:mod:`gpadjoint.lbfgs`), coordinates (:mod:`gpadjoint.coords`) and
stop rules (:mod:`gpadjoint.stops`), without a GP.

Claims: the two-loop product equals the dense BFGS inverse-Hessian update it stands for; L-BFGS
assembled from ``direction``, ``step_cap`` and ``weak_wolfe`` minimises a quadratic (to its
closed-form minimiser) and Rosenbrock's function; the accepted step satisfies the conditions it
claims; ``stop()`` abandons the search between evaluations; the coordinate maps invert each
other and their gradient matches finite differences; ``hessian_metric`` whitens a known
Hessian; the stop rules stop where they say and replay to the same state.
"""

import numpy as np
import pytest

from gpadjoint import coords, lbfgs
from gpadjoint.kernels import Params
from gpadjoint.stops import Converged, EarlyStopping, Plateau


def _minimise(f, grad, x0, *, iters=200, m=10, gtol=1e-10, cap=np.inf):
    """L-BFGS from the module's pieces (the trainer's loop without a GP)."""
    x, mem = np.asarray(x0, float), lbfgs.init_memory(len(x0), m)
    v, g = f(x), grad(x)
    for it in range(iters):
        if np.linalg.norm(g) <= gtol:
            return x, it
        hg, mem = lbfgs.direction(g, mem, x)
        d = -hg
        slope = float(g @ d)
        assert slope < 0

        def phi(t, x=x, d=d):
            xt = x + t * d
            return lbfgs.Trial(True, f(xt), float(grad(xt) @ d), xt)

        s = lbfgs.weak_wolfe(phi, v, slope, t_max=lbfgs.step_cap([d], [cap]))
        if s.trial is None:  # nothing lower along d: the round-off floor, as lbfgs.minimize stops
            return x, it
        assert s.trial.value <= v + 1e-4 * s.t * slope
        x = s.trial.payload
        v, g = f(x), grad(x)
    return x, iters


def test_two_loop_is_the_bfgs_inverse_hessian_update():
    rng = np.random.default_rng(0)
    k, m = 4, 3
    A = rng.normal(size=(k, k))
    A = A @ A.T + k * np.eye(k)
    xs = [rng.normal(size=k) for _ in range(m + 1)]
    mem = lbfgs.init_memory(k, m)
    for x in xs:
        _, mem = lbfgs.direction(A @ x, mem, x)
    # dense BFGS from gamma I over the m stored pairs (s_i, y_i = A s_i), oldest first
    S = [b - a for a, b in zip(xs, xs[1:])]
    Y = [A @ s for s in S]
    g = rng.normal(size=k)
    x_new = rng.normal(size=k)
    s_new, y_new = x_new - xs[-1], g - A @ xs[-1]
    pairs = (list(zip(S, Y)) + [(s_new, y_new)])[-m:]
    H = (s_new @ y_new) / (y_new @ y_new) * np.eye(k)
    for s, y in pairs:
        rho = 1.0 / (y @ s)
        V = np.eye(k) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    hg, _ = lbfgs.direction(g, mem, x_new)
    np.testing.assert_allclose(hg, H @ g, rtol=1e-12)
    # pure: the memory passed in is unchanged
    np.testing.assert_array_equal(lbfgs.direction(g, mem, x_new)[0], hg)


def test_first_direction_is_the_gradient_capped_to_length_one():
    g = np.array([3.0, 4.0])
    hg, mem = lbfgs.direction(g, lbfgs.init_memory(2, 5), np.zeros(2))
    np.testing.assert_allclose(hg, g / 5.0)
    assert int(mem.count) == 1
    small = np.array([0.3, 0.4])
    np.testing.assert_allclose(lbfgs.direction(small, lbfgs.init_memory(2, 5), np.zeros(2))[0],
                               small)
    with pytest.raises(ValueError, match="memory size"):
        lbfgs.init_memory(2, 0)


def test_minimises_a_quadratic_to_its_closed_form_minimiser():
    rng = np.random.default_rng(1)
    k = 6
    Q = np.linalg.qr(rng.normal(size=(k, k)))[0]
    A = Q @ np.diag(np.logspace(-2, 2, k)) @ Q.T  # condition number 1e4
    b = rng.normal(size=k)

    def f(x):
        return 0.5 * x @ A @ x - b @ x

    x, iters = _minimise(f, lambda x: A @ x - b, np.zeros(k), gtol=1e-8)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-7, atol=1e-9)
    assert iters < 200


def test_minimises_rosenbrock():
    def f(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    def grad(x):
        return np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2),
                         200 * (x[1] - x[0] ** 2)])

    x, iters = _minimise(f, grad, np.array([-1.2, 1.0]), gtol=1e-8)
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-7)
    assert iters < 100


def test_weak_wolfe_conditions_cap_and_stop_hook():
    f = lambda t: (t - 3.0) ** 2  # noqa: E731  along d = 1 from x = 0: slope -6
    calls = []

    def phi(t):
        calls.append(t)
        return lbfgs.Trial(True, f(t), 2 * (t - 3.0))

    s = lbfgs.weak_wolfe(phi, 9.0, -6.0, t_max=10.0, c1=1e-4, c2=0.9)
    assert s.wolfe and not s.interrupted and s.evaluations == len(calls)
    assert s.trial.value <= 9.0 + 1e-4 * s.t * -6.0 and s.trial.slope >= 0.9 * -6.0
    # the cap: no trial beyond t_max, and the capped point is taken when still descending
    capped = lbfgs.weak_wolfe(phi, 9.0, -6.0, t_max=0.5, c2=0.1)
    assert capped.t == 0.5 and not capped.wolfe
    assert lbfgs.step_cap([np.array([2.0, -4.0]), np.array(0.5)], [1.0, 2.0]) == 0.25
    # a failed trial (not ok) shrinks the step; stop() is asked before every evaluation
    bad = lbfgs.weak_wolfe(lambda t: lbfgs.Trial(t < 0.2, f(t), 2 * (t - 3.0)), 9.0, -6.0,
                           t_max=1.0)
    assert bad.trial is not None and bad.t < 0.2
    asked = []
    stopped = lbfgs.weak_wolfe(phi, 9.0, -6.0, t_max=10.0, c2=0.1,
                               stop=lambda: asked.append(1) or len(asked) > 1)
    assert stopped.interrupted and stopped.evaluations == 1
    assert stopped.t == 1.0 and stopped.trial.value == 4.0  # the best point so far is kept
    none = lbfgs.weak_wolfe(lambda t: lbfgs.Trial(False, np.nan, np.nan), 9.0, -6.0,
                            t_max=1.0, max_evals=4)
    assert none.trial is None and none.t == 0.0 and none.evaluations == 4


def test_coordinate_maps_invert_and_their_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    p = Params(rng.normal(size=3), rng.normal(), rng.normal(), rng.normal())
    back = coords.from_opt(coords.to_opt(p))
    np.testing.assert_allclose(coords.flat(back), coords.flat(p), rtol=1e-10, atol=1e-12)
    w = rng.normal(size=6)

    def loss_raw(r):  # any smooth function of the raw parameters
        return float(np.sin(r) @ w)

    g_raw = coords.unflat(np.cos(coords.flat(p)) * w, p)
    gu = coords.flat(coords.opt_grad(g_raw, p))
    u0, h = coords.flat(coords.to_opt(p)), 1e-6
    fd = [(loss_raw(coords.flat(coords.from_opt(coords.unflat(u0 + h * e, p))))
           - loss_raw(coords.flat(coords.from_opt(coords.unflat(u0 - h * e, p))))) / (2 * h)
          for e in np.eye(6)]
    np.testing.assert_allclose(gu, fd, rtol=1e-6, atol=1e-9)
    assert coords.moved(p, p) == 0.0


def test_hessian_metric_whitens_a_known_hessian():
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    A = Q @ np.diag([1e-3, 1.0, 10.0, 1e3]) @ Q.T
    seen = []
    M, lam = coords.hessian_metric(lambda x: A @ x + 1.0, rng.normal(size=4), step=1e-3,
                                   floor=1e-8, record=lambda x, g: seen.append(x))
    assert len(seen) == 5
    np.testing.assert_allclose(np.sort(lam), [1e-3, 1.0, 10.0, 1e3], rtol=1e-8)
    np.testing.assert_allclose(M.T @ A @ M, np.eye(4), atol=1e-8)
    # the floor: eigenvalues below floor * max are raised to it (1e-3 -> 10: 1e-4 there)
    M2, _ = coords.hessian_metric(lambda x: A @ x, np.zeros(4), floor=1e-2)
    assert np.min(np.linalg.eigvalsh(M2.T @ A @ M2)) == pytest.approx(1e-4, rel=1e-6)


def test_stop_rules_stop_where_they_say_and_replay():
    recs = [{"epoch": i + 1, "loss": v} for i, v in enumerate([5.0, 4.0, 3.99, 3.995, 3.98])]
    rule = Plateau(EarlyStopping(patience=3, min_delta=0.1))
    reasons = [rule.update(r) for r in recs]
    assert reasons[:4] == [None] * 4 and reasons[4].startswith("early stopping after epoch 5")
    assert Plateau(EarlyStopping(patience=3, min_delta=0.1)).replay(recs) == reasons[4]
    assert Plateau(EarlyStopping(patience=3, min_delta=0.1)).replay(recs[:4]) is None
    steps = [{"epoch": 1, "loss": 2.0, "new_loss": 1.0, "new_grad_norm": 1.0},
             {"epoch": 2, "loss": 1.0, "new_loss": 1.0 - 1e-9, "new_grad_norm": 0.5},
             {"epoch": 3, "loss": 1.0, "new_loss": 1.0 - 2e-9, "new_grad_norm": 0.5}]
    rule = Converged(rtol=1e-6, gtol=1e-3, patience=2)
    assert [rule.update(r) for r in steps][:2] == [None, None]
    assert "rtol" in Converged(rtol=1e-6, gtol=1e-3, patience=2).replay(steps)
    done = Converged(rtol=0.0, gtol=1e-3, patience=2).update(steps[0] | {"new_grad_norm": 1e-4})
    assert "gtol" in done
    assert Converged(1e-6, 1e-3, 2).update({"epoch": 1, "loss": 1.0}) is None  # not L-BFGS's


def _rosenbrock(x):
    a, b = x[:-1], x[1:]
    value = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    g[1:] += 200.0 * (b - a * a)
    return value, g


def test_minimize_reaches_a_quadratics_minimiser_and_rosenbrocks():
    rng = np.random.default_rng(4)
    k = 6
    A = rng.normal(size=(k, k))
    A = A @ A.T + 0.1 * np.eye(k)  # condition number in the hundreds
    b = rng.normal(size=k)
    res = lbfgs.minimize(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(k),
                         gtol=1e-7)
    assert res.converged and np.linalg.norm(res.grad) <= 1e-7
    # |x - x*| <= |g| / lambda_min(A) = 1e-6
    np.testing.assert_allclose(res.x, np.linalg.solve(A, b), atol=1e-6)
    # asked for more than round-off allows, it says so instead of stepping on
    tight = lbfgs.minimize(lambda x: (0.5 * x @ A @ x - b @ x, A @ x - b), np.zeros(k),
                           gtol=1e-15)
    assert not tight.converged and "no lower point" in tight.message
    assert tight.iterations < 1000
    rb = lbfgs.minimize(_rosenbrock, np.array([-1.2, 1.0, -0.5, 0.8]), gtol=1e-9)
    assert rb.converged and rb.message == "converged"
    np.testing.assert_allclose(rb.x, np.ones(4), atol=1e-8)
    assert rb.evaluations >= rb.iterations > 10


def test_minimize_steps_back_from_non_finite_points_and_honours_the_cap():
    # log barrier at x > 0: a unit step from x = 1 along -grad lands outside the domain
    def f(x):
        if x[0] <= 0:
            return np.nan, np.full(1, np.nan)
        return float(4.0 * x[0] - np.log(x[0])), np.array([4.0 - 1.0 / x[0]])

    res = lbfgs.minimize(f, np.array([1.0]), gtol=1e-12)
    assert res.converged and res.x[0] == pytest.approx(0.25, rel=1e-10)
    moves = []

    def quad(x):
        moves.append(x.copy())
        return float(x @ x), 2.0 * x

    capped = lbfgs.minimize(quad, np.array([10.0, 0.0]), gtol=1e-10,
                            max_step=lambda x, d: lbfgs.step_cap([d], [0.5]))
    steps = np.abs(np.diff(np.asarray(moves), axis=0))
    assert capped.converged and np.max(steps) <= 0.5 + 1e-12


def test_minimize_start_value_done_rule_and_stop():
    calls = []

    def quad(x):
        calls.append(x.copy())
        return float(x @ x), 2.0 * x

    x0 = np.array([3.0, -4.0])
    known = lbfgs.minimize(quad, x0, value0=25.0, grad0=2.0 * x0, gtol=1e-10)
    assert known.converged and not any(np.array_equal(c, x0) for c in calls)
    assert known.evaluations == len(calls)
    # a caller's own rule (here the value, not the gradient) decides convergence
    calls.clear()
    by_value = lbfgs.minimize(quad, x0, done=lambda x, v, g: v < 1e-3)
    assert by_value.converged and by_value.value < 1e-3
    # done at the start: nothing is stepped
    assert lbfgs.minimize(quad, x0, done=lambda x, v, g: True).iterations == 0
    calls.clear()
    stopped = lbfgs.minimize(quad, x0, gtol=1e-12, stop=lambda: len(calls) >= 2)
    assert stopped.interrupted and not stopped.converged and len(calls) == 2
    assert stopped.value <= 25.0
    with pytest.raises(ValueError, match="not finite"):
        lbfgs.minimize(lambda x: (np.nan, x), x0)
