"""The fused Lanczos + CG pass: same values and gradients as the two run apart, fewer passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem, rel_err, slow

from gpadjoint.fused import slq_and_solve
from gpadjoint.kernels import constrain, cross_cov, unconstrain
from gpadjoint.logdet import (
    half_inverse_factors,
    preconditioned_slq_logdet,
    rademacher,
    slq_from_tridiag,
    slq_logdet,
)
from gpadjoint.matvec import make_backend
from gpadjoint.mll import MLLConfig, neg_mll
from gpadjoint.solve import cg, inv_quad, make_preconditioner, pivoted_cholesky

N, DEPTH, P = 150, 8, 4


def _setup(dtype=jnp.float64, rank=5):
    X, y, params = problem(n=N, d=3, dtype=dtype)
    # noise 0.3: CG needs ~20-40 iterations, far from stagnation, so that both orders of
    # floating-point operations stop at the same iteration
    params = unconstrain(np.linspace(0.7, 1.6, 3), 1.3, 0.3, 0.1, dtype=dtype)
    be = make_backend("dense", "rbf")
    probes = rademacher(jax.random.PRNGKey(3), N, P, dtype)
    h = constrain(params)
    L = pivoted_cholesky(
        lambda i: cross_cov("rbf", jax.lax.dynamic_slice_in_dim(X, i, 1), X, h)[0],
        jnp.full((N,), h.outputscale, dtype),
        rank,
    )
    return X, y, params, be, probes, L


def _operator(params, X, be, L):
    h = constrain(params)
    mv, args = be.operator(X, h)
    h0 = jax.tree.map(jax.lax.stop_gradient, h)
    return mv, args, h0, make_preconditioner(L, h0.noise)


def _separate(params, X, y, be, probes, L, *, precond_logdet, tol, min_iter, x0, max_iter=1000):
    mv, args, h0, pre = _operator(params, X, be, L)
    if precond_logdet:
        ld = preconditioned_slq_logdet(mv, probes, *args, L=L, shift=h0.noise, depth=DEPTH)
    else:
        ld = slq_logdet(mv, probes, *args, depth=DEPTH, lower=0.5 * h0.noise)

    def solver(mv, b, args, sargs):
        return cg(
            mv, b, *args, precond=sargs[0], tol=tol, min_iter=min_iter, max_iter=max_iter,
            x0=sargs[1],
        )

    quad, _, info = inv_quad(mv, y - params.mean, *args, solver=solver, solver_args=(pre, x0))
    return ld + quad, info.iterations


def _fused(params, X, y, be, probes, L, *, precond_logdet, tol, min_iter, x0, max_iter=1000):
    mv, args, h0, pre = _operator(params, X, be, L)
    if precond_logdet:
        half, ldP, lower = half_inverse_factors(L, h0.noise, X.dtype)
    else:
        half, ldP, lower = None, 0.0, 0.5 * h0.noise
    tri, quad, _, info, passes = slq_and_solve(
        mv, probes, y - params.mean, *args, depth=DEPTH, precond=pre, tol=tol,
        min_iter=min_iter, max_iter=max_iter, x0=x0, half=half,
    )
    return ldP + slq_from_tridiag(tri, lower) + quad, (info.iterations, passes)


# CG is a nonlinear recursion: a change in the order of floating-point operations (the batched
# product) grows ~10x per iteration here, so long runs to a tight tolerance may stop one
# iteration apart. Long runs are therefore pinned to a fixed count (min_iter = max_iter).
@pytest.mark.parametrize(
    "precond_logdet,tol,min_iter,max_iter,warm",
    [
        slow(False, 1e-12, 12, 12, False),  # CG runs more iterations than the Lanczos depth
        slow(False, 0.5, 0, 1000, False),  # CG stops long before it: its column must freeze
        (True, 1e-12, 11, 11, True),  # preconditioned Lanczos operator, warm-started CG
        (False, 1.0, DEPTH + 2, 1000, True),  # the paper's rule: a minimum count, loose tolerance
    ],
)
def test_fused_equals_separate(precond_logdet, tol, min_iter, max_iter, warm):
    X, y, params, be, probes, L = _setup()
    x0 = 0.5 * (y - params.mean) / 1.3 if warm else None
    kw = dict(precond_logdet=precond_logdet, tol=tol, min_iter=min_iter, max_iter=max_iter, x0=x0)
    (v0, it0), g0 = jax.value_and_grad(_separate, has_aux=True)(params, X, y, be, probes, L, **kw)
    (v1, (it1, passes)), g1 = jax.value_and_grad(_fused, has_aux=True)(
        params, X, y, be, probes, L, **kw
    )
    assert int(it0) == int(it1)
    assert int(passes) == max(DEPTH, int(it1) + (1 if warm else 0))
    assert rel_err(v1, v0) <= 1e-8
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert rel_err(a, b) <= 1e-6, (a, b)


def test_fused_gradient_matches_finite_differences():
    # independent of the adjoint code: central differences of the fused estimator itself
    # (fixed probes; a tight CG so that the solve is a smooth function of the parameters)
    X, y, params, be, probes, L = _setup()
    kw = dict(precond_logdet=False, tol=1e-12, min_iter=0, x0=None)
    g = jax.grad(lambda p: _fused(p, X, y, be, probes, L, **kw)[0])(params)
    eps = 1e-6
    for leaf_name in ("raw_outputscale", "raw_noise", "mean"):
        base = getattr(params, leaf_name)
        up = params._replace(**{leaf_name: base + eps})
        dn = params._replace(**{leaf_name: base - eps})
        fd = (_fused(up, X, y, be, probes, L, **kw)[0] - _fused(dn, X, y, be, probes, L, **kw)[0])
        fd = fd / (2 * eps)
        assert abs(float(getattr(g, leaf_name)) - float(fd)) <= 1e-5 * max(1.0, abs(float(fd)))


@pytest.mark.keops
def test_passes_reported_by_neg_mll_count_real_keops_calls():
    # the pass count in aux is what the KeOps host callbacks actually executed
    from gpadjoint import keops_bridge as kb

    ok, why = kb.keops_available()
    if not ok:
        pytest.skip(f"KeOps unavailable: {why}")
    X, y, params = problem(n=N, d=3, dtype=jnp.float64)
    be = make_backend("keops", "matern32")
    cfg = MLLConfig(num_probes=3, lanczos_depth=5, precond_rank=4, cg_tol=1e-8, cg_min_iter=0)
    f = jax.jit(jax.value_and_grad(
        lambda p, x0: neg_mll(p, X, y, jax.random.PRNGKey(0), backend=be, config=cfg, x0=x0),
        has_aux=True,
    ))
    for x0 in (None, jnp.zeros(N)):
        f(params, x0)[0][0].block_until_ready()  # compile outside the count
        before = dict(kb.CALL_COUNTS)
        (value, aux), _ = f(params, x0)
        jax.block_until_ready(value)
        calls = (kb.CALL_COUNTS["kv"] - before["kv"]) + (kb.CALL_COUNTS["grad"] - before["grad"])
        assert calls == int(aux["passes"]), (calls, int(aux["passes"]), int(aux["cg_iterations"]))
        # the solve needed more iterations than the depth, so only the extra ones cost passes
        assert int(aux["cg_iterations"]) > cfg.lanczos_depth
        expected = max(5, int(aux["cg_iterations"]) + (x0 is not None)) + 5 + 1
        assert int(aux["passes"]) == expected
        np.testing.assert_allclose(float(value), float(f(params, x0)[0][0]), rtol=1e-12)


def test_a_traced_cg_cap_stops_cg_like_max_iter_without_recompiling():
    """cg_cap bounds CG as max_iter does (same iterations, value and gradient), but traced."""
    X, y, params, be, probes, L = _setup()
    mv, args, h0, pre = _operator(params, X, be, L)
    traces = []

    def run(cap, max_iter=1000):
        traces.append(1)
        tri, quad, _, info, _ = slq_and_solve(
            mv, probes, y - params.mean, *args, depth=DEPTH, precond=pre, tol=1e-12,
            min_iter=0, max_iter=max_iter, cg_cap=cap)
        return quad, info.iterations, info.residual[0]

    capped = jax.jit(run)
    free_q, free_it, _ = run(None)
    assert int(free_it) > 15  # the bounds below stop it early
    for cap in (5, 12):
        q, it, res = capped(jnp.asarray(float(cap), X.dtype))
        ref_q, ref_it, ref_res = run(None, max_iter=cap)
        assert int(it) == int(ref_it) == cap and float(res) > 1e-12
        # compiled against eager: the same iterations, values to rounding
        assert float(q) == pytest.approx(float(ref_q), rel=1e-9)
        assert float(res) == pytest.approx(float(ref_res), rel=1e-6)
    assert len(traces) == 1 + 1 + 2  # one trace of the jitted function for both caps
    # a cap above what CG needs changes nothing (compiled and eager may stop one iteration
    # apart at this tolerance, near stagnation: see above)
    q, it, _ = capped(jnp.asarray(1000.0, X.dtype))
    assert abs(int(it) - int(free_it)) <= 1 and float(q) == pytest.approx(float(free_q), rel=1e-9)
