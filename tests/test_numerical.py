"""Numerical trouble in the data: the fit finishes with finite values, or says why not.

Duplicate inputs, constant columns, targets at scales 1e6 and 1e-6, noise-free targets that
drive the noise to its floor, in both estimators (exact Cholesky and SLQ) and both dtypes.
Lanczos breakdown and float32 orthogonality are in test_lanczos.py; CG caps and non-finite
steps in test_train.py.
"""

import numpy as np
import pytest
from _util import slow

from gpadjoint.model import GPRegressor

# Adam pinned: these tests are about the estimator's numerics; L-BFGS's accept/reject decisions
# (the default with SLQ) can turn round-off-level differences into 1e-5 ones within 15 steps
SLQ = dict(estimator="slq", num_probes=8, lanczos_depth=15, precond_rank=10, epochs=15,
           lr=0.1, random_state=0, optimizer="adam")
EXACT = dict(estimator="exact", epochs=30, random_state=0)


def smooth(n=80, d=2, seed=0, noise=0.05):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n, d))
    y = np.sin(2 * X[:, 0]) + 0.5 * X[:, 1] ** 2 + noise * rng.standard_normal(n)
    return X, y


def assert_finite_fit(m, X):
    mu, sd = m.predict(X, return_std=True)
    assert np.all(np.isfinite(mu)) and np.all(np.isfinite(sd)) and np.all(sd > 0)
    hp = m.hyperparameters_
    assert np.all(np.isfinite(hp["lengthscale"])) and np.all(hp["lengthscale"] > 0)
    assert np.isfinite(hp["outputscale"]) and hp["noise"] > 0
    assert all(np.isfinite(h["loss"]) for h in m.history_)
    return mu, sd


@pytest.mark.parametrize("settings", [slow(SLQ, id="slq"), pytest.param(EXACT, id="exact")])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_duplicate_inputs(settings, dtype):
    X, y = smooth(n=40)
    X2 = np.vstack([X, X, X])  # every point three times, with different noise draws
    y2 = np.concatenate([y, y + 0.01, y - 0.01])
    m = GPRegressor(**settings, dtype=dtype).fit(X2, y2)
    mu, _ = assert_finite_fit(m, X)
    assert np.sqrt(np.mean((mu - y) ** 2)) < 0.5 * np.std(y)


@pytest.mark.parametrize("settings", [slow(SLQ, id="slq"), pytest.param(EXACT, id="exact")])
def test_constant_column(settings):
    X, y = smooth()
    Xc = np.column_stack([X, np.full(len(X), 3.0)])
    m = GPRegressor(**settings).fit(Xc, y)
    assert m.x_std_[2] == 1.0
    assert_finite_fit(m, Xc)


@pytest.mark.parametrize("settings", [slow(SLQ, id="slq"), pytest.param(EXACT, id="exact")])
def test_target_scale_does_not_matter(settings):
    # y * 1e6 and y * 1e-6 are the same problem once y is standardised: the predictions,
    # divided by the scale, must agree, and hyperparameters in y's units scale with it.
    X, y = smooth()
    Xt = smooth(n=20, seed=1)[0]
    preds, noise = [], []
    for scale in (1e6, 1e-6):
        m = GPRegressor(**settings).fit(X, y * scale)
        mu, sd = assert_finite_fit(m, Xt)
        preds.append(mu / scale)
        noise.append(m.hyperparameters_["noise"] / scale**2)
    np.testing.assert_allclose(preds[0], preds[1], rtol=1e-6, atol=1e-6 * np.std(y))
    np.testing.assert_allclose(noise[0], noise[1], rtol=1e-6)


@pytest.mark.parametrize("settings,dtype", [
    pytest.param(SLQ, "float64", id="slq-float64"), slow(SLQ, "float32", id="slq-float32"),
    pytest.param(EXACT, "float64", id="exact-float64"),
    pytest.param(EXACT, "float32", id="exact-float32")])
def test_noise_free_targets_drive_noise_to_its_floor(settings, dtype):
    X, y = smooth(n=60, noise=0.0)
    kw = dict(settings, epochs=60 if settings is SLQ else 60)
    m = GPRegressor(**kw, dtype=dtype).fit(X, y)
    mu, _ = assert_finite_fit(m, X)
    floor = m.config_.model.noise_floor * m.y_std_**2
    assert m.hyperparameters_["noise"] >= floor * (1 - 1e-6)
    assert m.hyperparameters_["noise"] < 0.05 * np.var(y)  # it did go down
    assert np.sqrt(np.mean((mu - y) ** 2)) < 0.1 * np.std(y)
