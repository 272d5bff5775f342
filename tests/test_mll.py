"""neg_mll against a dense Cholesky reference: exactness, unbiasedness, the CG solve."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem, rel_err, slow

from gpadjoint.kernels import Hypers, constrain, cross_cov, dense_cov
from gpadjoint.logdet import rademacher, slq_logdet
from gpadjoint.matvec import make_backend
from gpadjoint.mll import MLLConfig, neg_mll, neg_mll_exact
from gpadjoint.solve import cg, make_preconditioner, pivoted_cholesky

KEY = jax.random.PRNGKey(0)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["rbf", "matern32"])
def test_unit_probes_at_full_depth_are_exact(kernel):
    # n unit probes at depth n store n^3 Lanczos numbers (and cost n^4 flops): n = 200 keeps that
    # at 64 MiB; the stochastic tests below use n = 400-800.
    n = 200
    X, y, params = problem(n=n, d=3)
    be = make_backend("dense", kernel)
    cfg = MLLConfig(lanczos_depth=n, cg_tol=1e-13, cg_max_iter=5 * n)
    probes = math.sqrt(n) * jnp.eye(n)

    @jax.jit
    def f(p):
        return jax.value_and_grad(neg_mll, has_aux=True)(
            p, X, y, KEY, backend=be, config=cfg, probes=probes
        )

    (value, aux), grad = f(params)
    ref, grad_ref = jax.value_and_grad(neg_mll_exact)(params, X, y, kernel=kernel)
    assert abs(float(value) - float(ref)) <= 1e-8 * max(1.0, abs(float(ref)))
    for a, b in zip(grad, grad_ref):
        assert rel_err(a, b) < 1e-8
    assert float(aux["cg_residual"]) <= 1e-13


@pytest.mark.slow
def test_slq_logdet_and_its_gradient_are_unbiased():
    n, seeds, probes_per_seed = 400, 60, 4
    X, _, params = problem(n=n, d=3)
    be = make_backend("dense", "matern32")

    def logdet(p, key):
        mv, args = be.operator(X, constrain(p))
        Z = rademacher(key, n, probes_per_seed, X.dtype)
        return slq_logdet(mv, Z, *args, depth=40)

    def exact(p):
        return jnp.linalg.slogdet(dense_cov("matern32", X, constrain(p)))[1]

    keys = jax.random.split(jax.random.PRNGKey(42), seeds)
    vals, grads = jax.jit(jax.vmap(jax.value_and_grad(logdet), in_axes=(None, 0)))(params, keys)
    truth, gtruth = jax.value_and_grad(exact)(params)
    se = float(jnp.std(vals)) / math.sqrt(seeds)
    assert se > 0
    assert abs(float(jnp.mean(vals)) - float(truth)) < 3 * se
    for g, gt in zip(jax.tree.leaves(grads), jax.tree.leaves(gtruth)):
        mean = np.asarray(jnp.mean(g, axis=0))
        se_g = np.asarray(jnp.std(g, axis=0)) / math.sqrt(seeds)
        assert np.all(np.abs(mean - np.asarray(gt)) <= 3 * se_g + 1e-9 * np.abs(np.asarray(gt)))


def test_cg_reaches_tolerance_and_matches_cho_solve():
    n = 600
    X, y, params = problem(n=n, d=4)
    h = constrain(params)
    K = dense_cov("rbf", X, h)
    L = pivoted_cholesky(lambda i: cross_cov("rbf", X[i][None], X, h)[0],
                         jnp.full((n,), h.outputscale), 15)
    P = make_preconditioner(L, h.noise)
    B = jnp.stack([y, jnp.cos(X[:, 1])], axis=1)
    x, info = cg(lambda V, K: K @ V, B, K, precond=P, tol=1e-10, max_iter=2000)
    ref = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(K), True), B)
    assert np.all(np.asarray(info.residual) <= 1e-10)
    assert rel_err(x, ref) < 1e-7
    # the preconditioner pays: fewer iterations than plain CG to the same tolerance
    _, info_plain = cg(lambda V, K: K @ V, B, K, tol=1e-10, max_iter=2000)
    assert int(info.iterations) < int(info_plain.iterations)


@pytest.mark.parametrize("key", [None, jax.random.PRNGKey(3)], ids=["greedy", "random"])
def test_pivoted_cholesky_full_rank_is_exact(key):
    X, _, params = problem(n=40, d=2)
    h = constrain(params)
    Kx = cross_cov("matern52", X, X, h)
    L = pivoted_cholesky(lambda i: Kx[i], jnp.diag(Kx), 40, key=key)
    assert rel_err(L @ L.T, Kx) < 1e-8


def test_random_pivots_are_exact_on_their_rows_and_leave_less_outside():
    # randomly pivoted Cholesky: L L^T equals K on the pivots' rows (each column is one pivot),
    # the same key gives the same factor, and on inputs with a dense cluster and scattered
    # outliers (where greedy pivots chase the outliers) its residual trace tr(K - L L^T) at a
    # fixed rank is smaller, and CG preconditioned with it needs fewer iterations
    rng = np.random.default_rng(0)
    X = jnp.asarray(np.concatenate([0.3 * rng.standard_normal((1400, 3)),
                                    4.0 * rng.standard_normal((100, 3))]))
    h = Hypers(jnp.full((3,), 0.5), jnp.asarray(1.0), jnp.asarray(1e-3))
    K = dense_cov("matern32", X, h) - h.noise * jnp.eye(X.shape[0])
    row = lambda i: K[i]  # noqa: E731
    key = jax.random.PRNGKey(7)
    L = pivoted_cholesky(row, jnp.diag(K), 60, key=key)
    assert np.array_equal(np.asarray(L), np.asarray(pivoted_cholesky(row, jnp.diag(K), 60,
                                                                     key=key)))
    piv = np.flatnonzero(np.isclose(np.asarray(jnp.diag(K) - jnp.sum(L * L, 1)), 0.0,
                                    atol=1e-10))
    assert len(piv) >= 60
    assert rel_err((L @ L.T)[piv], K[piv]) < 1e-8
    G = pivoted_cholesky(row, jnp.diag(K), 60)
    trace = lambda F: float(jnp.trace(K) - jnp.sum(F * F))  # noqa: E731
    assert trace(L) < 0.8 * trace(G)
    Kn = K + h.noise * jnp.eye(X.shape[0])
    b = jnp.asarray(rng.standard_normal(X.shape[0]))
    its = [int(cg(lambda V: Kn @ V, b, precond=make_preconditioner(F, h.noise), tol=1e-8,
                  max_iter=3000)[1].iterations) for F in (L, G)]
    assert its[0] < its[1]


@pytest.mark.parametrize("backend", [slow("dense"), "blocked"])
def test_neg_mll_float32_close_to_exact_and_gradient_direction(backend):
    n = 800
    X, y, params = problem(n=n, d=3, dtype=jnp.float32)
    be = make_backend(backend, "matern32", tile=256)
    cfg = MLLConfig(num_probes=30, lanczos_depth=30, cg_tol=1e-4)
    (v, aux), g = jax.jit(
        lambda p: jax.value_and_grad(neg_mll, has_aux=True)(p, X, y, KEY, backend=be, config=cfg)
    )(params)
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    ref, gref = jax.value_and_grad(neg_mll_exact)(
        p64, X.astype(jnp.float64), y.astype(jnp.float64), kernel="matern32"
    )
    assert v.dtype == jnp.float32
    assert abs(float(v) - float(ref)) < 0.05 * max(1.0, abs(float(ref)))
    flat = np.concatenate([np.ravel(a) for a in g])
    flat_ref = np.concatenate([np.ravel(a) for a in gref])
    cos = flat @ flat_ref / np.linalg.norm(flat) / np.linalg.norm(flat_ref)
    assert cos > 0.95
    assert int(aux["cg_iterations"]) >= cfg.cg_min_iter


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"num_probes = 0: must be positive"):
        MLLConfig(num_probes=0)
    with pytest.raises(ValueError, match=r"cg_tol = -1.0: must be positive"):
        MLLConfig(cg_tol=-1.0)
    with pytest.raises(ValueError, match="lanczos_depth"):
        MLLConfig(lanczos_depth=2.5)


# --- the exact estimator (float64 Cholesky, chosen automatically at small n) -------------------


def _autodiff_reference(params, X, y, kernel):
    """-log p / n with plain jnp ops only, differentiated by JAX itself."""
    n = X.shape[0]
    K = dense_cov(kernel, X, constrain(params))
    Lc = jnp.linalg.cholesky(K)
    z = jax.scipy.linalg.solve_triangular(Lc, y - params.mean, lower=True)
    return 0.5 * (z @ z + 2 * jnp.sum(jnp.log(jnp.diag(Lc))) + n * math.log(2 * math.pi)) / n


@pytest.mark.parametrize("kernel", ["matern32", "rbf"])
def test_exact_estimator_value_and_gradient(kernel):
    X, y, params = problem(n=150, d=3)
    be = make_backend("dense", kernel)
    cfg = MLLConfig(estimator="exact")
    (value, aux), grad = jax.value_and_grad(neg_mll, has_aux=True)(
        params, X, y, KEY, backend=be, config=cfg
    )
    ref, grad_ref = jax.value_and_grad(_autodiff_reference)(params, X, y, kernel)
    assert abs(float(value) - float(ref)) <= 1e-12 * max(1.0, abs(float(ref)))
    for a, b in zip(grad, grad_ref):
        assert rel_err(a, b) < 1e-9
    # the warm-start slot holds K^{-1} (y - mu)
    K = dense_cov(kernel, X, constrain(params))
    assert rel_err(K @ aux["alpha"], y - params.mean) < 1e-9
    assert int(aux["cg_iterations"]) == 0


@pytest.mark.parametrize("kernel", ["matern32", slow("matern52")])
def test_exact_estimator_under_jit_equals_the_blocked_path(kernel):
    """The trainer's exact estimator (one JAX Cholesky, under jit) and gpadjoint.exact's blocked
    float64 path (several blocks, uneven n) give the same value and raw gradient."""
    from gpadjoint import exact

    X, y, params = problem(n=157, d=3)
    be = make_backend("dense", kernel)
    cfg = MLLConfig(estimator="exact")
    (value, _), grad = jax.jit(jax.value_and_grad(
        lambda p: neg_mll(p, X, y, KEY, backend=be, config=cfg), has_aux=True))(params)
    fg = exact.make_value_and_grad(np.asarray(X), np.asarray(y), kernel=kernel, block=50)
    f, g = fg(exact.flatten(params))
    assert float(value) == pytest.approx(f, rel=1e-12)
    np.testing.assert_allclose(exact.flatten(grad), g, rtol=1e-9, atol=1e-13)


def test_exact_estimator_works_in_float64_for_float32_data():
    # noise at 2e-4 makes K too ill-conditioned for a float32 Cholesky; the estimator computes
    # in float64 and returns float32 values and gradients that match the float64 reference.
    X, y, _ = problem(n=200, d=2)
    from gpadjoint.kernels import unconstrain

    p64 = unconstrain([0.8, 1.1], 2.0, 2e-4, 0.0, dtype=jnp.float64)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p64)
    be = make_backend("dense", "matern32")
    cfg = MLLConfig(estimator="exact")
    f = jax.value_and_grad(lambda p, X, y: neg_mll(p, X, y, KEY, backend=be, config=cfg)[0])
    v32, g32 = f(p32, X.astype(jnp.float32), y.astype(jnp.float32))
    v64, g64 = jax.value_and_grad(_autodiff_reference)(p64, X, y, "matern32")
    assert v32.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in g32)
    assert np.isfinite(float(v32))
    assert abs(float(v32) - float(v64)) <= 1e-5 * max(1.0, abs(float(v64)))
    for a, b in zip(g32, g64):
        assert rel_err(a, b) < 1e-3


def test_choose_estimator():
    from gpadjoint.mll import choose_estimator

    auto = MLLConfig(estimator="auto", exact_max_n=500)
    assert choose_estimator(500, auto)[0] == "exact"
    name, reason = choose_estimator(501, auto)
    assert name == "slq" and "501" in reason and "500" in reason
    assert choose_estimator(10, MLLConfig(estimator="slq")) == ("slq", "requested")
    with pytest.raises(ValueError, match=r"estimator = 'chol': choose one of 'auto', 'slq'"):
        MLLConfig(estimator="chol")
    with pytest.raises(ValueError, match="exact_max_n"):
        MLLConfig(exact_max_n=0)


# --- preconditioned SLQ: log det K = log det P + SLQ on P^{-1/2} K P^{-1/2} ---------------------


@pytest.mark.slow
def test_preconditioned_logdet_is_exact_at_full_depth():
    n = 120
    X, y, params = problem(n=n, d=3)
    be = make_backend("dense", "matern32")
    cfg = MLLConfig(lanczos_depth=n, precond_rank=8, precond_logdet=True, cg_tol=1e-13,
                    cg_max_iter=5 * n)
    probes = math.sqrt(n) * jnp.eye(n)
    (value, aux), grad = jax.value_and_grad(neg_mll, has_aux=True)(
        params, X, y, KEY, backend=be, config=cfg, probes=probes
    )
    ref, grad_ref = jax.value_and_grad(neg_mll_exact)(params, X, y, kernel="matern32")
    assert abs(float(value) - float(ref)) <= 1e-8 * max(1.0, abs(float(ref)))
    for a, b in zip(grad, grad_ref):
        assert rel_err(a, b) < 1e-6


@pytest.mark.slow
def test_preconditioned_logdet_is_unbiased_with_less_variance():
    # Depth 10, 4 probes, 40 seeds, noise 0.01 (244 eigenvalues of K above 2 sigma2): with a
    # rank-60 preconditioner the estimator centres on the exact log det K (within 3 standard
    # errors, value and lengthscale gradient). Plain SLQ at depth 10 cannot: its quadrature
    # misses the eigenvalues near the noise (measured: -854 against -1061, a 20% bias; depth 30
    # removes it), and its spread is 2.6x larger.
    n = 400
    X, y, params = problem(n=n, d=2)
    from gpadjoint.kernels import unconstrain

    params = unconstrain([0.6, 0.9], 1.5, 0.01, 0.0, dtype=jnp.float64)
    be = make_backend("dense", "matern32")
    h = constrain(params)

    def logdet_exact(p):
        return jnp.linalg.slogdet(dense_cov("matern32", X, constrain(p)))[1]

    exact, g_exact = jax.value_and_grad(logdet_exact)(params)
    L = pivoted_cholesky(lambda i: cross_cov("matern32", X[i][None], X, h)[0],
                         jnp.full((n,), h.outputscale), 60)
    from gpadjoint.logdet import preconditioned_slq_logdet

    def est(p, key, pre):
        hp = constrain(p)
        mv, args = be.operator(X, hp)
        Z = rademacher(key, n, 4, jnp.float64)
        if pre:
            return preconditioned_slq_logdet(mv, Z, *args, L=L, shift=h.noise, depth=10)
        return slq_logdet(mv, Z, *args, depth=10, lower=0.5 * h.noise)

    out, mean, gerr = {}, {}, {}
    for pre in (False, True):
        f = jax.jit(jax.value_and_grad(lambda p, k, pre=pre: est(p, k, pre)))
        vals, grads = zip(*[f(params, jax.random.PRNGKey(s)) for s in range(40)])
        vals = np.array([float(v) for v in vals])
        gl = np.array([np.asarray(g.raw_lengthscale) for g in grads])
        out[pre], mean[pre] = vals.std(ddof=1), vals.mean()
        want = np.asarray(g_exact.raw_lengthscale)
        gerr[pre] = np.abs(gl.mean(0) - want) / np.abs(want)
    se = out[True] / math.sqrt(40)
    assert abs(mean[True] - float(exact)) <= 3 * se, (mean, float(exact))
    assert abs(mean[True] - float(exact)) < 0.1 * abs(mean[False] - float(exact)), mean
    assert out[True] < 0.6 * out[False], out
    # the gradient keeps a small quadrature bias at depth 10 (measured 1-6%), plain SLQ more
    assert np.all(gerr[True] < 0.1) and np.all(gerr[True] < gerr[False]), gerr
