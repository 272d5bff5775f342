"""The common evaluator behind the table: against scikit-learn, and SLQ against Cholesky."""

import math

import numpy as np
import pytest
from _util import slow
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

from gpadjoint import evaluate


def _problem(n=300, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.sin(X @ rng.normal(size=d)) + 0.1 * rng.normal(size=n) + 0.7
    hp = {"lengthscale": [0.8, 1.5, 2.5][:d], "outputscale": 1.3, "noise": 0.05, "mean": 0.6}
    return X, y, hp


def _sklearn_loss(X, y, hp):
    k = (ConstantKernel(hp["outputscale"], "fixed")
         * Matern(hp["lengthscale"], "fixed", nu=1.5)
         + WhiteKernel(hp["noise"], "fixed"))
    gp = GaussianProcessRegressor(k, optimizer=None, alpha=0.0).fit(X, y - hp["mean"])
    return -gp.log_marginal_likelihood_value_ / len(y)


def test_cholesky_matches_scikit_learn():
    X, y, hp = _problem()
    out = evaluate.exact_loss(X, y, kernel="matern32", method="cholesky", block=64, **hp)
    assert out["method"] == "cholesky"
    assert out["loss"] == pytest.approx(_sklearn_loss(X, y, hp), rel=1e-10)
    # the parts add up: 0.5 (quad + logdet + n log 2 pi) / n
    n = len(y)
    assert out["loss"] == pytest.approx(
        0.5 * (out["quad"] + out["logdet"] + n * math.log(2 * math.pi)) / n, rel=1e-12)


@pytest.mark.parametrize("precond_rank", [slow(0), 20])
def test_slq_agrees_with_cholesky_within_its_standard_error(precond_rank):
    X, y, hp = _problem(n=400, seed=1)
    chol = evaluate.exact_loss(X, y, kernel="matern32", method="cholesky", **hp)
    slq = evaluate.exact_loss(X, y, kernel="matern32", method="slq", num_probes=64,
                              lanczos_depth=60, precond_rank=precond_rank, **hp)
    assert slq["method"] == "slq" and slq["loss_se"] > 0
    assert slq["precond_rank"] == precond_rank and slq["num_probes"] == 64
    assert abs(slq["loss"] - chol["loss"]) <= 4 * slq["loss_se"] + 1e-6
    # the solve stops where its bound on the loss error is about 1e-7 per datum (the stopping
    # rule uses |s|^2 / noise only; the reported bound adds the rounding term |x_k^T s|), and
    # the bound holds: it is derived from the true residual, not from exact arithmetic. The only
    # slack is the Cholesky reference's own rounding, ~ n eps cond(K) |quad| / n per datum.
    assert 0 < slq["quad_loss_bound"] <= 1.1e-7
    cond = 1 + hp["outputscale"] * 400 / hp["noise"]
    ref_rounding = 400 * np.finfo(np.float64).eps * cond * abs(chol["quad"]) / 400
    assert 0.5 * abs(slq["quad"] - chol["quad"]) / 400 <= slq["quad_loss_bound"] + ref_rounding
    # 60 steps on a 400-point problem: the quadrature has converged, and says so
    assert slq["loss_depth_change"] < slq["loss_se"]


@pytest.mark.slow
def test_slq_preconditioner_converges_sooner_and_probe_blocks_do_not_matter():
    X, y, hp = _problem(n=500, seed=2)
    chol = evaluate.exact_loss(X, y, kernel="matern32", method="cholesky", **hp)["loss"]
    kw = dict(kernel="matern32", method="slq", num_probes=32, lanczos_depth=30, **hp)
    plain = evaluate.exact_loss(X, y, precond_rank=0, **kw)
    pre = evaluate.exact_loss(X, y, precond_rank=50, **kw)
    # noise 0.05: K is ill-conditioned, 30 plain Lanczos steps have not converged (measured
    # 1.5e-2 of change over the last 15); on P^-1/2 K P^-1/2 they have (~1e-5), and the probe
    # spread is smaller too
    assert plain["loss_depth_change"] > 1e-3
    assert pre["loss_depth_change"] < 0.01 * plain["loss_depth_change"]
    assert pre["loss_se"] < plain["loss_se"]
    assert abs(pre["loss"] - chol) <= 4 * pre["loss_se"]
    # probes run in blocks when the Lanczos basis would not fit: the same probes, the same
    # estimate (blocks of 5 from the memory limit: 5 x 30 x 500 float64)
    small = evaluate._slq_loss(np.asarray(X, np.float64), y - hp["mean"],
                               evaluate.exact.as_hypers(hp["lengthscale"], hp["outputscale"],
                                                   hp["noise"]),
                               "matern32", 32, 30, 0, 50, max_block_bytes=8 * 30 * 500 * 5)
    assert small["logdet"] != pytest.approx(pre["logdet"], rel=1e-12)  # other probe draws
    assert abs(small["logdet"] - pre["logdet"]) <= 4 * math.sqrt(2) * pre["loss_se"] * 2 * 500


def test_auto_picks_cholesky_only_when_the_array_fits(monkeypatch):
    import gpadjoint.matvec as mv

    monkeypatch.setattr(mv, "available_memory_bytes", lambda: 10 * 2**30)
    fits = int(math.sqrt(0.69 * 10 * 2**30 / 8))
    too_big = int(math.sqrt(0.71 * 10 * 2**30 / 8))
    assert evaluate.choose_method(fits)[0] == "cholesky"
    method, reason = evaluate.choose_method(too_big)
    assert method == "slq" and "70%" in reason


def test_bad_input_is_refused_with_the_reason():
    X, y, hp = _problem(n=20)
    with pytest.raises(ValueError, match="positive"):
        evaluate.exact_loss(X, y, kernel="matern32", **(hp | {"noise": -1.0}))
    with pytest.raises(ValueError, match=r"X must be \(n, d\)"):
        evaluate.exact_loss(X, y[:-1], kernel="matern32", **hp)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.exact_loss(X, y, kernel="matern32", method="lu", **hp)


@pytest.mark.parametrize("block", [64, 2048])
def test_exact_point_matches_scikit_learn_loss_and_predictive(block):
    X, y, hp = _problem()
    Xt = np.random.default_rng(5).normal(size=(150, 3))
    out = evaluate.exact_point(X, y, Xt, kernel="matern32", block=block, **hp)
    assert out["loss"] == pytest.approx(_sklearn_loss(X, y, hp), rel=1e-10)
    k = (ConstantKernel(hp["outputscale"], "fixed")
         * Matern(hp["lengthscale"], "fixed", nu=1.5)
         + WhiteKernel(hp["noise"], "fixed"))
    gp = GaussianProcessRegressor(k, optimizer=None, alpha=0.0).fit(X, y - hp["mean"])
    mu, sd = gp.predict(Xt, return_std=True)  # WhiteKernel: noise included in sd
    np.testing.assert_allclose(out["mean"], mu + hp["mean"], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["var"], sd**2, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match=r"X_test must be \(m, 3\)"):
        evaluate.exact_point(X, y, Xt[:, :2], kernel="matern32", **hp)


@pytest.mark.parametrize("n, block", [(257, 64), (300, 300), (100, 128)])
def test_blocked_cholesky_and_substitution_match_numpy(n, block):
    import scipy.linalg as sla

    rng = np.random.default_rng(n)
    B = rng.normal(size=(n, n))
    A = B @ B.T + n * np.eye(n)
    L0 = np.linalg.cholesky(A)
    r = rng.normal(size=n)
    evaluate.blocked_cholesky(A, block)  # in place: the lower triangle becomes L
    np.testing.assert_allclose(np.tril(A), L0, rtol=0, atol=1e-12 * np.abs(L0).max())
    from gpadjoint import exact

    z = exact.solve_lower(A, r, block)
    np.testing.assert_allclose(z, sla.solve_triangular(L0, r, lower=True), atol=1e-12)
    R = rng.normal(size=(n, 3))  # several right-hand sides at once
    np.testing.assert_allclose(exact.solve_lower(A, R, block),
                               sla.solve_triangular(L0, R, lower=True), atol=1e-12)
    a = exact.solve_lower_t(A, z, block)
    np.testing.assert_allclose(a, np.linalg.solve(L0 @ L0.T, r), rtol=1e-9, atol=1e-14)
    Ai = np.linalg.inv(L0 @ L0.T)
    assert exact.trace_of_inverse(A, block) == pytest.approx(np.trace(Ai), rel=1e-10)


def test_blocked_cholesky_reports_an_indefinite_block():
    A = np.eye(300)
    A[200, 200] = -1.0
    with pytest.raises(np.linalg.LinAlgError, match="pivot block 128:256"):
        evaluate.blocked_cholesky(A, 128)


@pytest.mark.parametrize("block", [slow(64), 2048])
def test_scale_gradient_matches_autodiff_of_the_dense_loss(block):
    """The large-n diagnostic's gradient (output scale, noise, mean; raw and constrained)
    against jax.grad of the dense float64 loss, blocked and unblocked."""
    import jax
    import jax.numpy as jnp

    from gpadjoint.kernels import unconstrain
    from gpadjoint.mll import neg_mll_exact

    X, y, hp = _problem(n=257)
    g = evaluate.exact_scale_gradient(X, y, kernel="matern32", block=block, **hp)
    p = unconstrain(hp["lengthscale"], hp["outputscale"], hp["noise"], hp["mean"],
                    noise_floor=1e-4, dtype=jnp.float64)
    ref = jax.grad(neg_mll_exact)(p, jnp.asarray(X), jnp.asarray(y), kernel="matern32",
                                  noise_floor=1e-4)
    assert g["raw_outputscale"] == pytest.approx(float(ref.raw_outputscale), rel=1e-8)
    assert g["raw_noise"] == pytest.approx(float(ref.raw_noise), rel=1e-8)
    assert g["mean"] == pytest.approx(float(ref.mean), rel=1e-8)
    # the constrained ones by central differences of the Cholesky loss
    for name, key in (("outputscale", "outputscale"), ("noise", "noise"), ("mean", "mean_value")):
        eps = 1e-5 * abs(hp[name])
        up = evaluate.exact_loss(X, y, kernel="matern32", method="cholesky",
                                 **(hp | {name: hp[name] + eps}))["loss"]
        dn = evaluate.exact_loss(X, y, kernel="matern32", method="cholesky",
                                 **(hp | {name: hp[name] - eps}))["loss"]
        assert g[key] == pytest.approx((up - dn) / (2 * eps), rel=1e-5, abs=1e-9)
    with pytest.raises(ValueError, match="noise above"):
        evaluate.exact_scale_gradient(X, y, kernel="matern32", **(hp | {"noise": 1e-5}))
