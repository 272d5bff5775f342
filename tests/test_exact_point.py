"""scripts/exact_point.py: a point's exact loss and test scores, and the subset start it scores."""

import jax.numpy as jnp
import numpy as np
import pytest

from gpadjoint.data import from_arrays
from gpadjoint.kernels import NOISE_FLOOR, constrain, init_params, unconstrain
from gpadjoint.mll import neg_mll_exact
from gpadjoint.start import subset_start


@pytest.fixture(scope="module")
def xp(load_script):
    return load_script("exact_point")


def _data(n=260, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n, d))
    y = 3.0 * np.sin(X @ np.array([1.0, 0.5, -0.3])) + 0.2 * rng.standard_normal(n) + 4.0
    return X, y


def test_evaluate_point_matches_the_dense_loss_and_a_direct_posterior(xp):
    X, y = _data()
    sp = from_arrays(X[:200], y[:200], X_test=X[200:], y_test=y[200:])  # paper units
    hyp = {"lengthscale": [1.1, 1.9, 2.7], "outputscale": 4.0, "noise": 0.05, "mean": 0.2}
    out = xp.evaluate_point(sp, hyp)
    p = unconstrain(np.array(hyp["lengthscale"]), hyp["outputscale"], hyp["noise"],
                    hyp["mean"], noise_floor=NOISE_FLOOR, dtype=jnp.float64)
    ref = float(neg_mll_exact(p, jnp.asarray(sp.X_train), jnp.asarray(sp.y_train),
                              kernel="matern32", noise_floor=NOISE_FLOOR))
    assert out["loss"] == pytest.approx(ref, rel=1e-9)
    # the posterior mean by a dense solve
    from gpadjoint.kernels import cross_cov

    h = constrain(p, NOISE_FLOOR)
    K = np.asarray(cross_cov("matern32", jnp.asarray(sp.X_train), jnp.asarray(sp.X_train), h))
    Ks = np.asarray(cross_cov("matern32", jnp.asarray(sp.X_test), jnp.asarray(sp.X_train), h))
    mu = 0.2 + Ks @ np.linalg.solve(K + float(h.noise) * np.eye(200), sp.y_train - 0.2)
    rmse = np.sqrt(np.mean((sp.y_test - mu) ** 2))
    assert out["test_rmse"] == pytest.approx(rmse, rel=1e-8)
    assert out["n_train"] == 200 and out["n_test"] == 60
    with pytest.raises(SystemExit, match="2 lengthscales for d = 3"):
        xp.evaluate_point(sp, hyp | {"lengthscale": [1.0, 2.0]})


@pytest.mark.slow
def test_subset_point_is_the_default_start_in_the_papers_units(xp):
    X, y = _data(seed=1)
    scaled = from_arrays(X, y, scale_y=True)
    paper = from_arrays(X, y, scale_y=False)
    hyp, info = xp.subset_point(scaled, 120, paper)
    p, ref_info = subset_start(jnp.asarray(scaled.X_train), jnp.asarray(scaled.y_train),
                               init_params(3, jnp.float64), kernel="matern32", size=120,
                               seed=0, noise_floor=NOISE_FLOOR)
    h = constrain(p, NOISE_FLOOR)
    s = float(scaled.y_std)
    assert s != pytest.approx(1.0, rel=0.1)  # the conversion is exercised
    np.testing.assert_allclose(hyp["lengthscale"], np.asarray(h.lengthscale), rtol=1e-10)
    assert hyp["outputscale"] == pytest.approx(float(h.outputscale) * s**2, rel=1e-10)
    assert hyp["noise"] == pytest.approx(float(h.noise) * s**2, rel=1e-10)
    assert hyp["mean"] == pytest.approx(float(p.mean) * s, rel=1e-10, abs=1e-12)
    assert info["size"] == 120 and info["loss"] == pytest.approx(ref_info["loss"])
    # the same fit in the paper's units: its loss is the scaled one plus log(y_std)
    pp = unconstrain(np.array(hyp["lengthscale"]), hyp["outputscale"], hyp["noise"],
                     hyp["mean"], noise_floor=NOISE_FLOOR, dtype=jnp.float64)
    scaled_loss = float(neg_mll_exact(p, jnp.asarray(scaled.X_train),
                                      jnp.asarray(scaled.y_train), kernel="matern32",
                                      noise_floor=NOISE_FLOOR))
    paper_loss = float(neg_mll_exact(pp, jnp.asarray(paper.X_train), jnp.asarray(paper.y_train),
                                     kernel="matern32", noise_floor=NOISE_FLOOR))
    assert paper_loss == pytest.approx(scaled_loss + np.log(s), rel=1e-9)


def test_params_point_names_what_is_missing(xp, tmp_path):
    f = tmp_path / "h.json"
    f.write_text('{"final_hyperparameters": {"lengthscale": [1.0], "noise": 0.1}}')
    with pytest.raises(SystemExit, match="no outputscale"):
        xp.params_point(str(f))
    f.write_text('{"lengthscale": 2.0, "outputscale": 1.5, "noise": 0.1}')
    hyp, _ = xp.params_point(str(f))
    assert hyp == {"lengthscale": [2.0], "outputscale": 1.5, "noise": 0.1, "mean": 0.0}
