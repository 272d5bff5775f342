"""scripts/cg_cost.py: the CG trace it reports, and its unit conversion of a record."""


import jax.numpy as jnp
import numpy as np
import pytest

from gpadjoint.kernels import NOISE_FLOOR, constrain, dense_cov, unconstrain


@pytest.fixture(scope="module")
def cc(load_script):
    return load_script("cg_cost")


def test_record_params_converts_paper_units(cc):
    rec = {"final_hyperparameters": {"lengthscale": [1.5, 2.0], "outputscale": 8.0,
                                     "noise": 0.02, "mean": 0.6},
           "settings": {"config": {"model": {"scale_y": False}}}}
    h = constrain(cc.record_params(rec, 2.0, NOISE_FLOOR), NOISE_FLOOR)
    np.testing.assert_allclose(np.asarray(h.lengthscale), [1.5, 2.0], rtol=1e-10)
    assert float(h.outputscale) == pytest.approx(2.0, rel=1e-10)  # 8 / 2^2
    assert float(h.noise) == pytest.approx(0.005, rel=1e-8)
    rec["settings"]["config"]["model"]["scale_y"] = True  # already in scaled units
    h = constrain(cc.record_params(rec, 2.0, NOISE_FLOOR), NOISE_FLOOR)
    assert float(h.outputscale) == pytest.approx(8.0, rel=1e-10)


def test_run_cg_trace_matches_a_dense_solve(cc):
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.uniform(-2, 2, (300, 3)))
    y = jnp.asarray(np.sin(np.asarray(X[:, 0])) + 0.1 * rng.standard_normal(300))
    p = unconstrain(np.array([0.7, 1.0, 1.3]), 1.0, 1e-3, 0.0, noise_floor=NOISE_FLOOR,
                    dtype=jnp.float64)
    out = cc.run_cg(X, y, p, kernel="matern32", backend="blocked", rank=20, tol=1e-8,
                    max_iter=300, budget=60.0, noise_floor=NOISE_FLOOR)
    assert out["reached_tol"] and out["final_residual"] <= 1e-8
    assert out["residual_curve"][0] == pytest.approx(1.0)  # x0 = 0: residual y
    assert len(out["residual_curve"]) == out["iterations"] + 1
    # a weaker preconditioner needs more iterations on the same system
    weak = cc.run_cg(X, y, p, kernel="matern32", backend="blocked", rank=2, tol=1e-8,
                     max_iter=300, budget=60.0, noise_floor=NOISE_FLOOR)
    assert weak["iterations"] > out["iterations"]
    # the hyperparameters reported are the ones solved with, on an ill-conditioned system
    h, ref = out["hyperparameters"], constrain(p, NOISE_FLOOR)
    np.testing.assert_allclose(h["lengthscale"], np.asarray(ref.lengthscale), rtol=1e-12)
    assert h["noise"] == pytest.approx(float(ref.noise), rel=1e-12)
    K = dense_cov("matern32", X, ref)
    assert np.linalg.cond(np.asarray(K)) > 1e3
