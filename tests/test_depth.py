"""Lanczos depth that follows the quadrature's convergence (``MLLConfig.depth_tol``).

Claims: ``depth_change`` is the per-datum change of the SLQ log det between half and full
depth, which the first half of the same Lanczos run gives (checked against a separate run at
half the depth: the same probes give the same first steps); the L-BFGS trainer doubles the depth
while that change exceeds ``depth_tol`` and keeps it fixed with ``depth_tol = 0``; the depth is
part of the state, so a resumed run continues at the depth it had reached.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem, slow

from gpadjoint.kernels import init_params
from gpadjoint.matvec import make_backend
from gpadjoint.mll import MLLConfig, neg_mll
from gpadjoint.train import LBFGS, fit

N, D = 240, 3
DENSE = make_backend("dense", "matern32")
# a shallow start on a low-noise problem: depth 4 is far from converged there
CFG = MLLConfig(num_probes=6, lanczos_depth=4, precond_rank=5, cg_tol=1e-10, cg_min_iter=1,
                cg_max_iter=500, precond_logdet=True, depth_tol=1e-5, max_lanczos_depth=32)


@pytest.fixture(scope="module")
def data64():
    X, y, _ = problem(n=N, d=D, seed=11, dtype=jnp.float64)
    return X, y


def _params(noise_raw=-4.0):
    p = init_params(D, jnp.float64)
    return p._replace(raw_noise=jnp.asarray(noise_raw, jnp.float64))


@pytest.mark.parametrize("depth", [slow(4), 9, slow(16)])
def test_depth_change_is_the_change_from_half_depth(data64, depth):
    X, y = data64
    key = jax.random.PRNGKey(0)
    full = dataclasses.replace(CFG, lanczos_depth=depth)
    half = dataclasses.replace(CFG, lanczos_depth=depth // 2)
    _, aux = neg_mll(_params(), X, y, key, backend=DENSE, config=full)
    _, aux_half = neg_mll(_params(), X, y, key, backend=DENSE, config=half)
    expect = 0.5 * abs(float(aux["logdet"]) - float(aux_half["logdet"])) / N
    np.testing.assert_allclose(float(aux["depth_change"]), expect, rtol=1e-6, atol=1e-12)


def test_depth_change_shrinks_with_depth(data64):
    X, y = data64
    key = jax.random.PRNGKey(0)
    changes = [float(neg_mll(_params(), X, y, key, backend=DENSE,
                             config=dataclasses.replace(CFG, lanczos_depth=k))[1]["depth_change"])
               for k in (4, 8, 16, 32)]
    assert changes[0] > 1e-5, changes  # the shallow start is unconverged on this problem
    assert all(b < a for a, b in zip(changes, changes[1:])), changes
    assert changes[-1] < 0.05 * changes[0], changes


@pytest.mark.slow
def test_trainer_deepens_until_the_quadrature_converges(data64):
    X, y = data64
    res = fit(X, y, backend=DENSE, mll_config=CFG, optimizer=LBFGS(gtol=1e-6, rtol=0.0),
              epochs=8, params0=_params(), seed=0, progress=False)
    depths = [r["lanczos_depth"] for r in res.history]
    assert depths[0] > CFG.lanczos_depth, depths
    assert depths == sorted(depths) and set(depths) <= {4, 8, 16, 32}, depths
    assert any(r["deepened"] for r in res.history)
    last = res.history[-1]
    assert last["depth_change"] <= CFG.depth_tol or last["lanczos_depth"] == 32, last
    assert int(res.state.opt_state.depth) == depths[-1]


def test_zero_tolerance_keeps_the_depth(data64):
    X, y = data64
    cfg = dataclasses.replace(CFG, depth_tol=0.0)
    res = fit(X, y, backend=DENSE, mll_config=cfg, optimizer=LBFGS(gtol=1e-6, rtol=0.0),
              epochs=3, params0=_params(), seed=0, progress=False)
    assert {r["lanczos_depth"] for r in res.history} == {4}
    assert not any(r["deepened"] for r in res.history)


@pytest.mark.slow
def test_resumed_run_continues_at_the_reached_depth(data64, tmp_path):
    X, y = data64
    kw = dict(backend=DENSE, mll_config=CFG, optimizer=LBFGS(gtol=1e-9, rtol=0.0),
              params0=_params(), seed=0, progress=False)
    full = fit(X, y, epochs=6, **kw)
    ckpt = tmp_path / "run.ckpt"
    fit(X, y, epochs=3, checkpoint_path=ckpt, **kw)
    resumed = fit(X, y, epochs=6, checkpoint_path=ckpt, resume=True, **kw)
    assert [r["lanczos_depth"] for r in resumed.history] == [
        r["lanczos_depth"] for r in full.history]
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-8, atol=1e-10)
