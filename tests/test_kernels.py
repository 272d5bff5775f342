import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import rel_err, slow
from sklearn.gaussian_process.kernels import RBF, Matern

from gpadjoint.kernels import (
    NOISE_FLOOR,
    constrain,
    dense_cov,
    get_profile,
    softplus,
    softplus_inverse,
    unconstrain,
)

SK = {
    "rbf": lambda ls: RBF(ls),
    "matern12": lambda ls: Matern(ls, nu=0.5),
    "matern32": lambda ls: Matern(ls, nu=1.5),
    "matern52": lambda ls: Matern(ls, nu=2.5),
}


@pytest.mark.parametrize("kernel", sorted(SK))
def test_dense_cov_matches_scikit_learn(kernel):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 4))
    ls = np.array([0.5, 1.0, 2.0, 3.0])
    p = unconstrain(ls, 2.0, 0.3)
    K = dense_cov(kernel, jnp.asarray(X), constrain(p))
    ref = 2.0 * SK[kernel](ls)(X) + 0.3 * np.eye(60)
    assert rel_err(K, ref) < 1e-10
    assert np.allclose(np.diag(K), 2.3)


def test_softplus_roundtrip_and_noise_floor():
    y = jnp.array([1e-6, 0.1, 3.0, 50.0])
    assert np.allclose(softplus(softplus_inverse(y)), y, rtol=1e-10)
    p = unconstrain([1.0], 1.0, 0.2)
    assert float(constrain(p).noise) == pytest.approx(0.2, rel=1e-12)
    very_negative = p._replace(raw_noise=jnp.asarray(-1e3))
    assert float(constrain(very_negative).noise) == pytest.approx(NOISE_FLOOR)
    with pytest.raises(ValueError, match="noise floor"):
        unconstrain([1.0], 1.0, NOISE_FLOOR / 2)


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of rbf, matern12"):
        get_profile("matern72")


@pytest.mark.parametrize("kernel", [slow(k) if k == "matern12" else k for k in sorted(SK)])
def test_gradient_finite_on_the_diagonal(kernel):
    # the Matern profiles contain sqrt(r2): its derivative at r2 = 0 must not leak NaN
    X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 2)))
    X = jnp.concatenate([X, X[:1]])  # a duplicate point too
    p = unconstrain([1.0, 2.0], 1.0, 0.1)
    g = jax.grad(lambda p: jnp.sum(dense_cov(kernel, X, constrain(p))))(p)
    assert all(np.all(np.isfinite(x)) for x in g)
