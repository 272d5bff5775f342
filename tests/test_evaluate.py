"""The common evaluator behind the table: against scikit-learn, and SLQ against Cholesky."""

import math

import numpy as np
import pytest
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


def test_slq_agrees_with_cholesky_within_its_standard_error():
    X, y, hp = _problem(n=400, seed=1)
    chol = evaluate.exact_loss(X, y, kernel="matern32", method="cholesky", **hp)
    slq = evaluate.exact_loss(X, y, kernel="matern32", method="slq", num_probes=64,
                              lanczos_depth=60, **hp)
    assert slq["method"] == "slq" and slq["loss_se"] > 0
    assert abs(slq["loss"] - chol["loss"]) <= 4 * slq["loss_se"] + 1e-6
    assert slq["quad"] == pytest.approx(chol["quad"], rel=1e-6)  # the solve is to 1e-8


def test_auto_picks_cholesky_only_when_the_array_fits(monkeypatch):
    monkeypatch.setattr(evaluate, "_available_bytes", lambda: 10 * 2**30)
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
    z = evaluate._forward_substitution(A, r, block)
    np.testing.assert_allclose(z, sla.solve_triangular(L0, r, lower=True), atol=1e-12)


def test_blocked_cholesky_reports_an_indefinite_block():
    A = np.eye(300)
    A[200, 200] = -1.0
    with pytest.raises(np.linalg.LinAlgError, match="pivot block 128:256"):
        evaluate.blocked_cholesky(A, 128)
