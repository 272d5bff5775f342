"""Shared helpers for the tests: dtype-aware tolerances and small random problems."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from gpadjoint.kernels import unconstrain

# relative-error tolerances keyed on dtype (float32 accumulates round-off over n-term sums)
RTOL = {jnp.float64: 1e-8, jnp.float32: 1e-4}


def slow(*values, id=None):
    """One ``pytest.param`` row marked slow: run by ``-m slow`` (CI's second step) only."""
    return pytest.param(*values, marks=pytest.mark.slow, id=id)


def grid(*axes):
    """``pytest.param`` rows for the product of ``axes``, all but a covering few marked slow.

    The fast suite keeps rows 0..m-1 of the "diagonal" (row i takes value i mod len of each
    axis; m the longest axis), so every value of every axis is tested by default and the whole
    product by ``-m slow`` (CI runs both).
    """
    m = max(len(a) for a in axes)
    core = {tuple(a[i % len(a)] for a in axes) for i in range(m)}
    return [pytest.param(*row, marks=() if row in core else pytest.mark.slow)
            for row in itertools.product(*axes)]


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def problem(n=120, d=3, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.sin(X[:, 0]) + 0.5 * np.cos(2 * X[:, 1 % d]) + 0.1 * rng.standard_normal(n)
    params = unconstrain(
        np.linspace(0.7, 1.6, d), 1.3, 0.05, 0.1, dtype=dtype
    )
    return jnp.asarray(X, dtype), jnp.asarray(y, dtype), params


def sklearn_posterior(h, X, y, X_test):
    """Mean and std (noise included) of scikit-learn's GP with hyperparameters ``h`` fixed.

    ``h`` is a ``GPRegressor.hyperparameters_``-style dict in the data's own units (Matern-3/2,
    ARD lengthscales, output scale, noise, constant mean): an independent float64 reference.
    """
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    k = (ConstantKernel(h["outputscale"], "fixed")
         * Matern(np.asarray(h["lengthscale"], np.float64), "fixed", nu=1.5)
         + WhiteKernel(h["noise"], "fixed"))
    ref = GaussianProcessRegressor(k, alpha=0.0, optimizer=None).fit(X, y - h["mean"])
    mu, sd = ref.predict(X_test, return_std=True)
    return mu + h["mean"], sd
