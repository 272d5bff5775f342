"""scripts/slq_bias.py: the exact side equals the package's exact loss, and the SLQ rows converge
to it as the depth grows (a full-depth, full-rank SLQ is the exact loss up to probe noise)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpadjoint.kernels import unconstrain
from gpadjoint.mll import neg_mll_exact


@pytest.mark.slow
def test_slq_bias_record(load_script, tmp_path):
    mod = load_script("slq_bias")
    Xn, yn, y_std = mod.scaled_data("yacht", 0)
    h = {"lengthscale": [1.5] * Xn.shape[1], "outputscale": 2.0 * y_std**2,
         "noise": 0.05 * y_std**2, "mean": 0.0}
    rec = {"final_hyperparameters": h}
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    assert mod.main(["yacht", "--record", str(tmp_path / "rec.json"), "--grid", "4,5", "40,100",
                     "--out-dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "yacht-split0.json").read_text())
    p = unconstrain(np.full(Xn.shape[1], 1.5), 2.0, 0.05, 0.0, noise_floor=1e-4, dtype=jnp.float64)
    ref = float(neg_mll_exact(p, jnp.asarray(Xn), jnp.asarray(yn), kernel="matern32",
                              noise_floor=1e-4))
    np.testing.assert_allclose(out["exact"]["loss"], ref, rtol=1e-10)
    g = jax.grad(neg_mll_exact)(p, jnp.asarray(Xn), jnp.asarray(yn), kernel="matern32",
                                noise_floor=1e-4)
    assert np.isclose(np.linalg.norm(out["exact"]["grad_opt"]),
                      np.linalg.norm(mod.opt_gradient(p, g)), rtol=1e-8)
    shallow, deep = out["rows"]
    assert abs(deep["bias"]) < abs(shallow["bias"]) and abs(deep["bias"]) < 1e-2
    assert deep["grad_error"] < shallow["grad_error"]
