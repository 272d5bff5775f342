"""gpadjoint.exact: the blocked float64 loss, gradient and posterior against dense references
(numpy / scikit-learn / jax autodiff of the dense formula / finite differences), on n that no
block size divides."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import slow

from gpadjoint import exact
from gpadjoint.kernels import Params, dense_cov
from gpadjoint.mll import neg_mll_exact


def _problem(n=203, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.sin(X @ rng.normal(size=d)) + 0.1 * rng.normal(size=n) + 0.7
    h = exact.as_hypers([0.8, 1.5, 2.5][:d], 1.3, 0.05)
    return X, y, h


def _dense_K(X, h, kernel="matern32"):
    from gpadjoint.kernels import Hypers

    return np.asarray(dense_cov(kernel, jnp.asarray(X), Hypers(*h)))


@pytest.mark.parametrize("n, block", [(203, 64), (203, 203), (50, 128), slow(129, 32)])
def test_build_factor_inverse_match_numpy(n, block):
    X, _, h = _problem(n=n)
    K = _dense_K(X, h)
    A = exact.build_lower(X, h, "matern32", block)
    np.testing.assert_allclose(np.tril(A), np.tril(K), rtol=1e-13, atol=1e-14)
    exact.cholesky_in_place(A, block)
    L0 = np.linalg.cholesky(K)
    np.testing.assert_allclose(np.tril(A), L0, atol=1e-12)
    rng = np.random.default_rng(1)
    R = rng.normal(size=(n, 2))
    np.testing.assert_allclose(exact.solve_lower(A, R, block),
                               np.linalg.solve(L0, R), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(exact.solve_lower_t(A, R[:, 0], block),
                               np.linalg.solve(L0.T, R[:, 0]), rtol=1e-9, atol=1e-10)
    Kinv = np.linalg.inv(K)
    assert exact.trace_of_inverse(A, block) == pytest.approx(np.trace(Kinv), rel=1e-10)
    exact.inverse_in_place(A, block)
    scale = np.abs(Kinv).max()
    np.testing.assert_allclose(np.tril(A), np.tril(Kinv), atol=1e-9 * scale)


def test_factor_loss_matches_dense_formula_and_scikit_learn():
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    X, y, h = _problem()
    f = exact.factor(X, y, h, 0.6, kernel="matern32", block=64)
    k = (ConstantKernel(1.3, "fixed") * Matern([0.8, 1.5, 2.5], "fixed", nu=1.5)
         + WhiteKernel(0.05, "fixed"))
    gp = GaussianProcessRegressor(k, optimizer=None, alpha=0.0).fit(X, y - 0.6)
    assert f.loss == pytest.approx(-gp.log_marginal_likelihood_value_ / len(y), rel=1e-10)
    Xt = np.random.default_rng(5).normal(size=(77, 3))
    mu, sd = gp.predict(Xt, return_std=True)  # WhiteKernel: noise in sd
    m, v = exact.posterior(f, Xt, batch=30)
    np.testing.assert_allclose(m, mu + 0.6, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(v, sd**2, rtol=1e-8, atol=1e-10)
    _, vf = exact.posterior(f, Xt, include_noise=False)
    np.testing.assert_allclose(vf, sd**2 - 0.05, rtol=1e-7, atol=1e-10)
    with pytest.raises(ValueError, match=r"X_test must be \(m, 3\)"):
        exact.posterior(f, Xt[:, :2])


@pytest.mark.parametrize("block", [slow(64), 1024])
def test_gradient_matches_autodiff_of_the_dense_loss_and_finite_differences(block):
    X, y, _ = _problem(n=203, d=3, seed=2)
    rng = np.random.default_rng(3)
    theta = np.concatenate([rng.normal(0.3, 0.5, 3), [0.4, -2.0, 0.2]])
    fg = exact.make_value_and_grad(X, y, kernel="matern32", block=block)
    f, g = fg(theta)
    ref_f, ref_g = jax.value_and_grad(
        lambda t: neg_mll_exact(Params(t[:-3], t[-3], t[-2], t[-1]), jnp.asarray(X),
                                jnp.asarray(y), kernel="matern32"))(jnp.asarray(theta))
    assert f == pytest.approx(float(ref_f), rel=1e-11)
    np.testing.assert_allclose(g, np.asarray(ref_g), rtol=1e-8, atol=1e-12)
    eps = 1e-5
    fd = np.array([(fg(theta + eps * e)[0] - fg(theta - eps * e)[0]) / (2 * eps)
                   for e in np.eye(theta.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)
    # the buffer is reused, and a second call at the same point gives the same numbers
    f2, g2 = fg(theta)
    assert f2 == f and np.array_equal(g, g2)


def test_constrained_gradient_and_the_mean():
    X, y, h = _problem(n=90, seed=4)

    def dense(ls, s2, noise, mean):
        from gpadjoint.kernels import Hypers

        K = dense_cov("matern32", jnp.asarray(X), Hypers(ls, s2, noise))
        r = jnp.asarray(y) - mean
        L = jnp.linalg.cholesky(K)
        z = jax.scipy.linalg.solve_triangular(L, r, lower=True)
        return exact.neg_mll_from_terms(z @ z, 2 * jnp.sum(jnp.log(jnp.diag(L))), len(y))

    ref = jax.grad(dense, argnums=(0, 1, 2, 3))(h.lengthscale, h.outputscale, h.noise, 0.3)
    f = exact.factor(X, y, h, 0.3, kernel="matern32", block=40)
    loss, gh, gm = exact.value_and_grad(f)
    assert loss == pytest.approx(float(dense(*h, 0.3)), rel=1e-12)
    np.testing.assert_allclose(gh.lengthscale, ref[0], rtol=1e-8)
    assert float(gh.outputscale) == pytest.approx(float(ref[1]), rel=1e-8)
    assert float(gh.noise) == pytest.approx(float(ref[2]), rel=1e-8)
    assert gm == pytest.approx(float(ref[3]), rel=1e-8)


def test_bad_input_is_refused():
    X, y, h = _problem(n=20)
    with pytest.raises(ValueError, match="positive"):
        exact.factor(X, y, exact.as_hypers(1.0, 1.0, -0.1), 0.0, kernel="matern32")
    with pytest.raises(ValueError, match=r"X must be \(n, d\)"):
        exact.factor(X, y[:-1], h, 0.0, kernel="matern32")
    A = np.eye(300)
    A[200, 200] = -1.0
    with pytest.raises(np.linalg.LinAlgError, match="pivot block 128:256"):
        exact.cholesky_in_place(A, 128)


def test_factor_fits_reports_its_reason(monkeypatch):
    import gpadjoint.matvec as mv

    monkeypatch.setattr(mv, "available_memory_bytes", lambda: 10 * 2**30)
    assert exact.factor_fits(30000)[0]  # 6.7 GiB of 10
    ok, why = exact.factor_fits(40000)
    assert not ok and "11.9 GiB" in why and "70%" in why
