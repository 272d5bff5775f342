"""Every backend equals the dense reference in value and VJP (w.r.t. V and each theta part)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import RTOL, problem, rel_err

from gpadjoint.kernels import KERNEL_NAMES, constrain, dense_cov
from gpadjoint.matvec import choose_backend, make_backend


def reference(X, V, h, kernel):
    # reference K built with broadcast differences (no GEMM expansion), independent of sq_dist
    Xs = X / h.lengthscale
    r2 = jnp.sum((Xs[:, None, :] - Xs[None, :, :]) ** 2, -1)
    from gpadjoint.kernels import get_profile

    K = h.outputscale * get_profile(kernel)(r2) + h.noise * jnp.eye(X.shape[0], dtype=X.dtype)
    return K @ V


def check_backend(name, kernel, dtype, ncols, n=150, tile=64):
    X, _, params = problem(n=n, d=3, dtype=dtype)
    h = constrain(params)
    rng = np.random.default_rng(3)
    shape = (n,) if ncols is None else (n, ncols)
    V = jnp.asarray(rng.standard_normal(shape), dtype)
    U = jnp.asarray(rng.standard_normal(shape), dtype)
    be = make_backend(name, kernel, tile=tile)
    out, vjp = jax.vjp(lambda V, h: be.matvec(X, V, h), V, h)
    ref, vjp_ref = jax.vjp(lambda V, h: reference(X, V, h, kernel), V, h)
    tol = RTOL[dtype]
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    (Vb, hb), (Vb_ref, hb_ref) = vjp(U), vjp_ref(U)
    assert rel_err(Vb, Vb_ref) < tol
    for field in ("lengthscale", "outputscale", "noise"):
        assert rel_err(getattr(hb, field), getattr(hb_ref, field)) < tol, field


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("name", ["dense", "blocked"])
@pytest.mark.parametrize("ncols", [None, 4])
def test_jax_backends_match_dense_reference(name, kernel, dtype, ncols):
    check_backend(name, kernel, dtype, ncols)


@pytest.mark.parametrize("kernel", ["rbf", "matern32", "matern52"])
@pytest.mark.parametrize("tile", [7, 50, 150, 1000])
@pytest.mark.parametrize("ncols", [None, 5])
def test_blocked_closed_form_vjp_matches_autodiff_through_tiles(kernel, tile, ncols):
    # the hand-written hyperparameter VJP against JAX autodiff through the same tiles, for
    # tiles that divide n, that leave a padded remainder, equal n and exceed it
    import gpadjoint.matvec as mvmod
    from gpadjoint.kernels import cross_cov

    X, _, params = problem(n=150, d=4)
    h = constrain(params)
    rng = np.random.default_rng(5)
    shape = (150,) if ncols is None else (150, ncols)
    U = jnp.asarray(rng.standard_normal(shape))
    V = jnp.asarray(rng.standard_normal(shape))

    def tile_rows(start, Xt, X, V, hypers):
        return cross_cov(kernel, Xt, X, hypers, diag_offset=start) @ V

    fast = mvmod._blocked_hypers_vjp(kernel, tile, X, U, V, h)
    slow = mvmod._blocked_hypers_vjp_autodiff(tile_rows, tile, X, U, V, h)
    for field in ("lengthscale", "outputscale", "noise"):
        assert rel_err(getattr(fast, field), getattr(slow, field)) < 1e-10, field


def test_blocked_backend_really_tiles(monkeypatch):
    # prove the blocked path ran: count tile evaluations through the cross-covariance it calls
    import gpadjoint.matvec as mvmod

    calls = []
    real = mvmod.cross_cov

    def counting(*a, **k):
        calls.append(a[1].shape)
        return real(*a, **k)

    monkeypatch.setattr(mvmod, "cross_cov", counting)
    X, _, params = problem(n=100)
    be = make_backend("blocked", "rbf", tile=32)
    out = be.matvec(X, jnp.ones(100), constrain(params))
    assert calls and calls[0] == (32, 3)  # one traced tile of 32 rows, mapped over 4 tiles
    assert rel_err(out, dense_cov("rbf", X, constrain(params)) @ jnp.ones(100)) < 1e-10


def test_dense_operator_builds_K_once(monkeypatch):
    # one operator serves every matvec of an evaluation (Lanczos, CG, their VJPs): K is built
    # when the operator is made, never again per matvec, and gradients still reach theta
    import gpadjoint.matvec as mvmod

    builds = []
    real = mvmod.dense_cov

    def counting(*a, **k):
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mvmod, "dense_cov", counting)
    X, _, params = problem(n=50)
    V = jnp.ones((50, 2))

    def three_matvecs(h):
        mv, args = make_backend("dense", "matern32").operator(X, h)
        return jnp.sum(mv(mv(mv(V, *args), *args), *args))

    h = constrain(params)
    value, grad = jax.value_and_grad(three_matvecs)(h)
    assert len(builds) == 1
    K = real("matern32", X, h)
    assert rel_err(value, jnp.sum(K @ K @ K @ V)) < 1e-12
    ref = jax.grad(lambda h: jnp.sum(real("matern32", X, h) @ real("matern32", X, h)
                                     @ real("matern32", X, h) @ V))(h)
    for a, b in zip(grad, ref):
        assert rel_err(a, b) < 1e-10


def test_operator_is_stable_so_prediction_compiles_once():
    # the blocked operator is passed to jitted functions as a static argument: the same
    # settings must give the same function, or each prediction would compile anew
    from gpadjoint import GPRegressor
    from gpadjoint import predict as gpred

    be = make_backend("blocked", "matern32", tile=32)
    X, _, params = problem(n=40)
    assert be.operator(X, constrain(params))[0] is be.operator(X, constrain(params))[0]
    rng = np.random.default_rng(3)
    Xtr = rng.standard_normal((70, 2))
    ytr = np.sin(Xtr[:, 0]) + 0.1 * rng.standard_normal(70)
    m = GPRegressor(backend="blocked", estimator="slq", epochs=0, variance="exact",
                    random_state=0).fit(Xtr, ytr)
    before = gpred._var_exact_batch._cache_size()
    outs = [m.predict(Xtr[:9], return_std=True)[1] for _ in range(3)]
    assert gpred._var_exact_batch._cache_size() == before + 1  # three calls, one compile
    assert np.array_equal(outs[0], outs[2])


def test_unknown_backend_and_auto_choice():
    with pytest.raises(ValueError, match="choose one of dense, blocked, keops"):
        make_backend("cuda", "rbf")
    name, why = choose_backend(2000, jnp.float32, on_gpu=False)
    assert name == "dense" and "GiB" in why
    name, why = choose_backend(2_000_000, jnp.float32, on_gpu=False)
    assert name == "blocked" and "KeOps" in why


@pytest.mark.keops
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_keops_backend_matches_dense_reference_float64(kernel):
    pytest.importorskip("pykeops")
    import gpadjoint.keops_bridge as kb

    before = dict(kb.CALL_COUNTS)
    check_backend("keops", kernel, jnp.float64, 4)
    assert kb.CALL_COUNTS['kv'] > before['kv']  # KeOps actually ran
    assert kb.CALL_COUNTS['grad'] > before['grad']


@pytest.mark.keops
def test_keops_backend_matches_dense_reference_float32():
    pytest.importorskip("pykeops")
    import gpadjoint.keops_bridge as kb

    before = dict(kb.CALL_COUNTS)
    check_backend("keops", "matern32", jnp.float32, 4)
    assert kb.CALL_COUNTS['kv'] > before['kv']
    assert kb.CALL_COUNTS['grad'] > before['grad']


def test_auto_on_gpu_without_keops_says_what_it_chose_instead(monkeypatch):
    import gpadjoint.keops_bridge as kb

    monkeypatch.setattr(kb, "keops_available", lambda: (False, "g++ not found"))
    name, why = choose_backend(2_000_000, jnp.float32, on_gpu=True)
    assert name == "blocked" and "KeOps unavailable (g++ not found)" in why
    monkeypatch.setattr(kb, "keops_available", lambda: (True, ""))
    assert choose_backend(2_000_000, jnp.float32, on_gpu=True)[0] == "keops"
