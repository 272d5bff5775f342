"""The stop on L-BFGS's predicted decrease (``LBFGS.ptol``, ``[optim] lbfgs_ptol``).

Claims: on the exact (deterministic) loss, whose minimum scipy finds independently, a fit stopped
by the predicted decrease ends within a small multiple of ``ptol`` of the minimum, in fewer steps
than a gradient-norm stop at 1e-8; the rule itself counts consecutive small predictions and
replays a resumed history the same way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from gpadjoint.kernels import init_params
from gpadjoint.matvec import make_backend
from gpadjoint.mll import MLLConfig, neg_mll_exact
from gpadjoint.stops import PredictedDecrease
from gpadjoint.train import LBFGS, fit

N, D = 160, 2
EXACT = MLLConfig(estimator="exact")
DENSE = make_backend("dense", "matern32")


def _minimum(X, y) -> float:
    flat0, unravel = ravel_pytree(init_params(D, jnp.float64))
    vg = jax.jit(jax.value_and_grad(lambda f: neg_mll_exact(unravel(f), X, y, kernel="matern32")))

    def fun(f):
        v, g = vg(jnp.asarray(f))
        return float(v), np.asarray(g, np.float64)

    res = minimize(fun, np.asarray(flat0), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 2000})
    return float(res.fun)


def test_predicted_decrease_stop_ends_near_the_known_minimum():
    X, y, _ = problem(n=N, d=D, seed=4, dtype=jnp.float64)
    best = _minimum(X, y)
    ptol = 1e-4
    # the rule reads the model only in a metric (here a plain rescaling of the coordinates)
    metric = tuple(map(tuple, 0.5 * np.eye(D + 3)))
    res = fit(X, y, backend=DENSE, mll_config=EXACT, epochs=300, seed=0, progress=False,
              optimizer=LBFGS(ptol=ptol, gtol=0.0, rtol=0.0, metric=metric))
    assert "predicts a decrease" in res.stopped_reason, res.stopped_reason
    gap = res.history[-1]["new_loss"] - best
    assert -1e-9 <= gap <= 3 * ptol, gap
    tight = fit(X, y, backend=DENSE, mll_config=EXACT, epochs=300, seed=0, progress=False,
                optimizer=LBFGS(gtol=1e-8, rtol=0.0))
    assert len(res.history) < len(tight.history)
    assert tight.history[-1]["new_loss"] - best <= gap + 1e-9


def test_no_prediction_without_a_metric():
    """Without a Hessian metric the records carry no prediction, so the rule never fires."""
    X, y, _ = problem(n=N, d=D, seed=4, dtype=jnp.float64)
    res = fit(X, y, backend=DENSE, mll_config=EXACT, epochs=5, seed=0, progress=False,
              optimizer=LBFGS(ptol=1.0, gtol=0.0, rtol=0.0))
    assert len(res.history) == 5 and "predicted_decrease" not in res.history[-1]


def test_rule_counts_consecutive_small_predictions_and_replays():
    recs = [{"epoch": e, "predicted_decrease": p}
            for e, p in enumerate([1e-2, 5e-5, 1e-3, 5e-5, 2e-5, 1e-6], start=1)]
    rule = PredictedDecrease(1e-4, patience=2)
    reasons = [rule.update(r) for r in recs]
    assert reasons[:4] == [None] * 4 and reasons[4] is not None and "step 5" in reasons[4]
    assert PredictedDecrease(1e-4, 2).replay(recs[:5]) == reasons[4]
    assert PredictedDecrease(1e-4, 2).update({"epoch": 1}) is None  # not an L-BFGS record


@pytest.mark.slow
def test_irrelevant_input_lengthscale_runs_off_and_the_fit_still_converges():
    """A pure-noise input's 1/l heads to 0 and line searches step past it (from_opt reads |u|):
    the slope along such a line must take the sign flip, or L-BFGS stalls short of the minimum."""
    rng = np.random.default_rng(8)
    X = rng.standard_normal((150, 2))
    y = np.sin(1.5 * X[:, 0]) + 0.05 * rng.standard_normal(150)  # input 1 is irrelevant
    X, y = jnp.asarray(X), jnp.asarray(y)
    best = _minimum(X, y)
    res = fit(X, y, backend=DENSE, mll_config=EXACT, epochs=400, seed=0, progress=False,
              optimizer=LBFGS(gtol=1e-7, rtol=0.0))
    assert res.history[-1]["new_loss"] - best <= 1e-7, (res.stopped_reason,
                                                         res.history[-1]["new_loss"] - best)
    ls = np.logaddexp(np.asarray(res.params.raw_lengthscale), 0.0)
    assert ls[1] > 10 * ls[0]  # the irrelevant input's lengthscale ran off
