"""Posterior mean and variance against a dense Cholesky reference; LOVE accuracy; clamping."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem, rel_err, slow

from gpadjoint import predict as gpred
from gpadjoint.kernels import constrain, cross_cov, dense_cov, unconstrain
from gpadjoint.matvec import make_backend


def dense_posterior(kernel, X, y, Xs, params, noise_floor=1e-4):
    """Exact posterior mean and var_y = var_f + sigma2 by Cholesky (the textbook formulas)."""
    h = constrain(params, noise_floor)
    L = jnp.linalg.cholesky(dense_cov(kernel, X, h))
    alpha = jax.scipy.linalg.cho_solve((L, True), y - params.mean)
    Ks = cross_cov(kernel, Xs, X, h)
    V = jax.scipy.linalg.solve_triangular(L, Ks.T, lower=True)
    return params.mean + Ks @ alpha, h.outputscale - jnp.sum(V * V, axis=0) + h.noise


def inputs(m, d, seed=7, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, d)), dtype)


@pytest.mark.parametrize(
    "kernel,backend", [slow("matern32", "dense"), ("rbf", "blocked"), ("matern52", "dense")]
)
def test_mean_and_exact_std_match_dense_cholesky(kernel, backend):
    X, y, params = problem(n=200, d=3)
    Xs = inputs(45, 3)
    be = make_backend(backend, kernel, tile=64)
    alpha, info = gpred.mean_weights(X, y, params, backend=be, tol=1e-10)
    assert float(jnp.max(info.residual)) <= 1e-10
    # batch 16 does not divide 45: the padded last batch is exercised
    mean = gpred.predict_mean(Xs, X, alpha, params, kernel=kernel, batch_size=16)
    var = gpred.predict_variance(
        Xs, X, params, backend=be, method="exact", tol=1e-10, batch_size=16
    )
    mean_ref, var_ref = dense_posterior(kernel, X, y, Xs, params)
    assert mean.shape == var.shape == (45,)
    assert rel_err(mean, mean_ref) < 1e-6
    assert rel_err(jnp.sqrt(var), jnp.sqrt(var_ref)) < 1e-6
    # one batch or many: same numbers
    mean1 = gpred.predict_mean(Xs, X, alpha, params, kernel=kernel)
    assert rel_err(mean1, mean) < 1e-12


def test_default_tolerance_gives_accurate_mean_in_float64():
    X, y, params = problem(n=200, d=3)
    Xs = inputs(30, 3)
    be = make_backend("dense", "matern32")
    alpha, _ = gpred.mean_weights(X, y, params, backend=be)  # tol = DEFAULT_CG_TOL["float64"]
    mean = gpred.predict_mean(Xs, X, alpha, params, kernel="matern32")
    mean_ref, _ = dense_posterior("matern32", X, y, Xs, params)
    assert rel_err(mean, mean_ref) < 1e-6


@pytest.mark.slow
def test_float32_mean_and_std_are_close():
    X, y, params = problem(n=200, d=3, dtype=jnp.float32)
    Xs = inputs(40, 3, dtype=jnp.float32)
    be = make_backend("dense", "matern32")
    alpha, _ = gpred.mean_weights(X, y, params, backend=be)
    mean = gpred.predict_mean(Xs, X, alpha, params, kernel="matern32")
    var = gpred.predict_variance(Xs, X, params, backend=be, method="exact")
    assert mean.dtype == var.dtype == jnp.float32
    X64, y64, p64 = problem(n=200, d=3)
    mean_ref, var_ref = dense_posterior("matern32", X64, y64, inputs(40, 3), p64)
    assert rel_err(mean, mean_ref) < 5e-3
    assert rel_err(jnp.sqrt(var), jnp.sqrt(var_ref)) < 5e-3


def test_include_noise_adds_exactly_the_noise():
    X, y, params = problem(n=100, d=3)
    Xs = inputs(20, 3)
    be = make_backend("dense", "rbf")
    vy = gpred.predict_variance(Xs, X, params, backend=be, method="exact")
    vf = gpred.predict_variance(Xs, X, params, backend=be, method="exact", include_noise=False)
    noise = float(constrain(params).noise)
    np.testing.assert_allclose(np.asarray(vy - vf), noise, rtol=1e-12)
    assert np.all(np.asarray(vf) >= 0)


def test_love_at_full_rank_is_exact():
    X, y, params = problem(n=60, d=2)
    Xs = inputs(25, 2)
    be = make_backend("dense", "matern32")
    R = gpred.love_root(X, y, params, backend=be, rank=60)
    assert R.shape == (60, 60)
    var = gpred.predict_variance(Xs, X, params, backend=be, method="love", love_R=R)
    _, var_ref = dense_posterior("matern32", X, y, Xs, params)
    assert rel_err(var, var_ref) < 1e-8


def test_love_rank_is_clamped_and_built_from_y_when_not_cached():
    X, y, params = problem(n=30, d=2)
    be = make_backend("dense", "rbf")
    assert gpred.love_root(X, y, params, backend=be, rank=500).shape == (30, 30)
    var = gpred.predict_variance(
        X[:5], X, params, backend=be, method="love", y=y, love_rank=500
    )
    _, var_ref = dense_posterior("rbf", X, y, X[:5], params)
    assert rel_err(var, var_ref) < 1e-8
    with pytest.raises(ValueError, match="love_R or the training targets"):
        gpred.predict_variance(X[:5], X, params, backend=be, method="love")


def test_love_with_constant_targets_starts_from_ones():
    X, _, params = problem(n=40, d=2)
    y = jnp.full((40,), float(params.mean))  # y - mu == 0 exactly
    R = gpred.love_root(X, y, params, backend=make_backend("dense", "rbf"), rank=10)
    assert np.all(np.isfinite(np.asarray(R))) and float(jnp.linalg.norm(R)) > 0


@pytest.mark.slow
def test_love_error_at_realistic_rank():
    """n = 1000, d = 3, Matern-3/2 at MLL-fitted hyperparameters (Adam on the exact MLL).

    Measured std relative error (max / median over 300 test points):
    rank 50: 6.2e-2 / 7.2e-3, rank 100: 1.3e-2 / 1.4e-3. LOVE is conservative (var >= exact).
    """
    rng = np.random.default_rng(0)
    n = 1000
    X = jnp.asarray(rng.standard_normal((n, 3)))
    y = jnp.sin(2 * X[:, 0]) + 0.3 * X[:, 1] + 0.3 * jnp.asarray(rng.standard_normal(n))
    Xs = inputs(300, 3, seed=3)
    params = unconstrain(jnp.array([1.07, 5.22, 5.72]), 0.365, 0.0878, 0.0)
    be = make_backend("dense", "matern32")
    _, var_ref = dense_posterior("matern32", X, y, Xs, params)
    errors = {}
    for rank in (50, 100):
        R = gpred.love_root(X, y, params, backend=be, rank=rank)
        var = gpred.predict_variance(Xs, X, params, backend=be, method="love", love_R=R)
        err = np.abs(np.sqrt(np.asarray(var)) / np.sqrt(np.asarray(var_ref)) - 1)
        errors[rank] = (err.max(), np.median(err))
        assert np.all(np.asarray(var) >= np.asarray(var_ref) * (1 - 1e-9))
    print("LOVE std rel. error (max, median):", errors)
    assert errors[50][0] < 0.1 and errors[50][1] < 0.02
    assert errors[100][0] < 0.02 and errors[100][1] < 0.005


@pytest.mark.parametrize("dtype", [slow(jnp.float32), jnp.float64])
def test_variance_is_clamped_where_round_off_makes_it_negative(dtype):
    # predictions at training inputs with a long lengthscale and noise near a tiny floor: the
    # exact latent variance is ~1e-9, below what the subtraction s2 - k^T K^-1 k resolves
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.uniform(-1, 1, (200, 2)), dtype)
    y = jnp.sin(3 * X[:, 0])
    floor = 1e-9
    params = unconstrain(jnp.array([2.0, 2.0]), 1.0, 2e-9, 0.0, noise_floor=floor, dtype=dtype)
    be = make_backend("dense", "rbf")
    kw = dict(backend=be, noise_floor=floor, max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gpred.CGConvergenceWarning)
        raw = gpred.latent_variance_exact(X[:50], X, params, **kw)
        assert float(jnp.min(raw)) < 0  # the case is real: unclamped, round-off goes negative
        noise = float(constrain(params, floor).noise)
        for method in ("exact", "love"):
            var = gpred.predict_variance(
                X[:50], X, params, method=method, y=y, love_rank=40, **kw
            )
            v = np.asarray(var, np.float64)
            assert np.all(np.isfinite(v)) and np.all(v >= noise * (1 - 1e-6))
            assert np.all(np.isfinite(np.sqrt(v)))


def test_unconverged_solve_warns():
    X, y, params = problem(n=100, d=3)
    be = make_backend("dense", "matern32")
    with pytest.warns(gpred.CGConvergenceWarning, match="posterior mean"):
        gpred.mean_weights(X, y, params, backend=be, precond_rank=0, tol=1e-12, max_iter=2)
    with pytest.warns(gpred.CGConvergenceWarning, match="predictive variance"):
        gpred.predict_variance(
            X[:4], X, params, backend=be, method="exact", precond_rank=0, tol=1e-12, max_iter=2
        )


def test_choices_and_batch_budget():
    assert gpred.choose_variance(5000)[0] == "exact"
    assert gpred.choose_variance(5001)[0] == "love"
    for n in (10, 5000, 100_000, 10**8):
        b = gpred.default_batch_size(n)
        assert 1 <= b <= gpred.MAX_BATCH and (b == 1 or b * n <= gpred.CROSS_COV_BUDGET)
    X, y, params = problem(n=20, d=2)
    with pytest.raises(ValueError, match="unknown variance method"):
        gpred.predict_variance(X, X, params, backend=make_backend("dense", "rbf"), method="x")
    assert gpred.default_cg_tol(jnp.float32) == gpred.DEFAULT_CG_TOL["float32"]


def test_empty_test_set():
    X, y, params = problem(n=20, d=2)
    be = make_backend("dense", "rbf")
    alpha, _ = gpred.mean_weights(X, y, params, backend=be)
    Xs = jnp.zeros((0, 2))
    assert gpred.predict_mean(Xs, X, alpha, params, kernel="rbf").shape == (0,)
    assert gpred.predict_variance(Xs, X, params, backend=be, method="exact").shape == (0,)


# --- the exact posterior (blocked float64 Cholesky) and the automatic choice ------------------


def _fitted(n=120, posterior="auto", **kw):
    from gpadjoint.model import GPRegressor

    rng = np.random.default_rng(11)
    X = rng.uniform(-2, 2, (n + 40, 3)) * np.array([1.0, 10.0, 0.1])
    y = 5 + 3 * np.sin(X[:, 0]) + 0.02 * X[:, 1] ** 2 + 0.1 * rng.standard_normal(n + 40)
    m = GPRegressor(epochs=3, random_state=0, posterior=posterior, **kw).fit(X[:n], y[:n])
    return m, X[:n], y[:n], X[n:], y[n:]


def test_exact_posterior_matches_scikit_learn_mean_std_and_nll():
    from _util import sklearn_posterior

    m, X, y, Xt, yt = _fitted()
    assert m.posterior_ == "exact" and m.solver_ == "cholesky"
    assert m.posterior_reason_.startswith("auto: K needs")
    mu, sd = m.predict(Xt, return_std=True)
    mu_ref, sd_ref = sklearn_posterior(m.hyperparameters_, X, y, Xt)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-9, atol=1e-9 * np.std(y))
    np.testing.assert_allclose(sd, sd_ref, rtol=1e-8)

    def nll(mu, sd):
        return np.mean(0.5 * np.log(2 * np.pi * sd**2) + 0.5 * (yt - mu) ** 2 / sd**2)

    assert nll(mu, sd) == pytest.approx(nll(mu_ref, sd_ref), rel=1e-9)
    # alpha_ is the factor's, and equals a dense solve in internal units
    np.testing.assert_allclose(m.predict(Xt), mu, rtol=0, atol=0)


def test_exact_posterior_survives_save_and_load(tmp_path):
    from gpadjoint.model import GPRegressor

    m, _, _, Xt, _ = _fitted()
    mu, sd = m.predict(Xt, return_std=True)
    m2 = GPRegressor.load(m.save(tmp_path / "m.npz"))
    assert m2.solver_ == "cholesky" and m2._posterior() == "exact"
    mu2, sd2 = m2.predict(Xt, return_std=True)  # the factor is rebuilt on first use
    np.testing.assert_allclose(mu2, mu, rtol=1e-12)
    np.testing.assert_allclose(sd2, sd, rtol=1e-12)


def test_posterior_choice_is_automatic_reported_and_overridable(monkeypatch, capsys):
    import gpadjoint.matvec as mv
    from gpadjoint.predict import choose_posterior

    monkeypatch.setattr(mv, "available_memory_bytes", lambda: 10 * 2**30)
    assert choose_posterior(30000)[0] == "exact"  # 6.7 GiB of 10
    name, why = choose_posterior(40000)  # 11.9 GiB
    assert name == "cg" and "70%" in why and "11.9 GiB" in why
    assert choose_posterior(10, "cg") == ("cg", "requested")
    with pytest.raises(ValueError, match="unknown posterior"):
        choose_posterior(10, "lu")
    # the estimator takes the choice, prints it and predicts by it
    monkeypatch.setattr(mv, "available_memory_bytes", lambda: 1000)
    m, X, y, Xt, _ = _fitted(verbose=True)
    assert m.posterior_ == "cg" and m.solver_ == "cg" and "auto:" in m.posterior_reason_
    assert "posterior: cg (auto: K would need" in capsys.readouterr().out
    forced, *_ = _fitted(posterior="exact")
    assert forced.posterior_ == "exact" and forced.posterior_reason_ == "requested"
    # the CG posterior at its default tolerance is close to the exact one here
    mu_cg, sd_cg = m.predict(Xt, return_std=True)
    mu_ex, sd_ex = forced.predict(Xt, return_std=True)
    np.testing.assert_allclose(mu_cg, mu_ex, rtol=1e-3, atol=1e-3 * np.std(y))
    from gpadjoint.config import default_config

    assert default_config().predict.posterior == "auto"
    with pytest.raises(ValueError, match=r"\[predict\] posterior = 'lu'"):
        default_config().with_keywords(posterior="lu")


def test_the_posterior_is_chosen_again_when_training_ends(monkeypatch):
    """A fit planned with little memory free predicts exactly if the memory is free by then."""
    import gpadjoint.matvec as mv
    import gpadjoint.model as gm

    free = {"bytes": 1000}  # at the plan: nothing fits
    monkeypatch.setattr(mv, "available_memory_bytes", lambda: free["bytes"])
    real = gm.recheck_prediction

    def freed(plan, cfg):
        assert plan.posterior.name == "cg"  # what the plan said before training
        free["bytes"] = 10 * 2**30  # the other job has ended
        return real(plan, cfg)

    monkeypatch.setattr(gm, "recheck_prediction", freed)
    m, X, y, Xt, _ = _fitted()
    assert m.posterior_ == "exact" and m.solver_ == "cholesky" and m.variance_ == "exact"
    assert "re-checked after training; before it: cg" in m.posterior_reason_
    monkeypatch.setattr(gm, "recheck_prediction", real)
    ref, *_ = _fitted(posterior="exact")
    np.testing.assert_allclose(m.predict(Xt), ref.predict(Xt), rtol=1e-12)
    # with the memory unchanged the plan's choice stands, its reason untouched
    free["bytes"] = 1000
    m2, *_ = _fitted()
    assert m2.posterior_ == "cg" and "re-checked" not in m2.posterior_reason_
