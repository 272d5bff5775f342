"""Every backend equals the dense reference in value and VJP (w.r.t. V and each theta part)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import RTOL, grid, problem, rel_err

from gpadjoint.kernels import KERNEL_NAMES, constrain, dense_cov
from gpadjoint.matvec import choose_backend, make_backend


def reference(X, V, h, kernel):
    # reference K built with broadcast differences (no GEMM expansion), independent of sq_dist
    Xs = X / h.lengthscale
    r2 = jnp.sum((Xs[:, None, :] - Xs[None, :, :]) ** 2, -1)
    from gpadjoint.kernels import get_profile

    K = h.outputscale * get_profile(kernel)(r2) + h.noise * jnp.eye(X.shape[0], dtype=X.dtype)
    return K @ V


def check_backend(name, kernel, dtype, ncols, n=150, tile=64, tol=None, **kw):
    X, _, params = problem(n=n, d=3, dtype=dtype)
    h = constrain(params)
    rng = np.random.default_rng(3)
    shape = (n,) if ncols is None else (n, ncols)
    V = jnp.asarray(rng.standard_normal(shape), dtype)
    U = jnp.asarray(rng.standard_normal(shape), dtype)
    be = make_backend(name, kernel, tile=tile, **kw)
    out, vjp = jax.vjp(lambda V, h: be.matvec(X, V, h), V, h)
    ref, vjp_ref = jax.vjp(lambda V, h: reference(X, V, h, kernel), V, h)
    tol = tol or RTOL[dtype]
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    (Vb, hb), (Vb_ref, hb_ref) = vjp(U), vjp_ref(U)
    assert rel_err(Vb, Vb_ref) < tol
    for field in ("lengthscale", "outputscale", "noise"):
        assert rel_err(getattr(hb, field), getattr(hb_ref, field)) < tol, field


@pytest.mark.parametrize("name,kernel,dtype,ncols", grid(
    ["dense", "blocked"], KERNEL_NAMES, [jnp.float64, jnp.float32], [None, 4]))
def test_jax_backends_match_dense_reference(name, kernel, dtype, ncols):
    check_backend(name, kernel, dtype, ncols)


# n = 150 with these tiles: 1, 2 (nb even: the tile at distance nb/2 lies in two strips), 3, 5
# and 22 tiles, the last one padded except for 50 and 150
@pytest.mark.parametrize("kernel,tile,symmetric", grid(
    KERNEL_NAMES, [7, 50, 64, 100, 150, 1000], [False, True]))
def test_blocked_layouts_match_dense_reference_on_uneven_n(kernel, tile, symmetric):
    check_backend("blocked", kernel, jnp.float64, 5, tile=tile, symmetric=symmetric)
    check_backend("blocked", kernel, jnp.float32, None, tile=tile, symmetric=symmetric)


# kernel entries in float32 with float64 products: errors of float32's rounding of each entry
# (eps32 = 1.2e-7), not of float32 sums over n terms; float32 working dtype: as float32
MIXED_RTOL = {jnp.float64: 20 * float(jnp.finfo(jnp.float32).eps), jnp.float32: 1e-4}


@pytest.mark.parametrize("kernel,tile,dtype,symmetric", grid(
    KERNEL_NAMES, [7, 64, 150], [jnp.float64, jnp.float32], [False, True]))
def test_mixed_precision_matches_dense_reference(kernel, tile, dtype, symmetric):
    check_backend("blocked", kernel, dtype, 4, tile=tile, tol=MIXED_RTOL[dtype],
                  symmetric=symmetric, precision="mixed")


def test_mixed_precision_really_rounds_the_entries():
    # prove the float32 entries ran: the mixed pass differs from the full one by float32's
    # rounding, far above float64's and far below the tolerance above
    X, _, params = problem(n=90)
    V = jnp.ones((90, 2))
    full = make_backend("blocked", "matern52", tile=32).matvec(X, V, constrain(params))
    mixed = make_backend("blocked", "matern52", tile=32, precision="mixed").matvec(
        X, V, constrain(params))
    assert 1e-10 < rel_err(mixed, full) < MIXED_RTOL[jnp.float64]


def test_precision_is_validated():
    with pytest.raises(ValueError, match="choose one of full, mixed"):
        make_backend("blocked", "rbf", precision="half")
    with pytest.raises(ValueError, match="blocked backend only"):
        make_backend("dense", "rbf", precision="mixed")


@pytest.mark.parametrize("kernel,tile,ncols,layout", grid(
    ["rbf", "matern32", "matern52"], [7, 50, 150, 1000], [None, 5], ["rows", "sym"]))
def test_blocked_closed_form_vjp_matches_autodiff_through_tiles(kernel, tile, ncols, layout):
    # the hand-written hyperparameter VJP against JAX autodiff through the same tiles, for
    # tiles that divide n, that leave a padded remainder, equal n and exceed it
    import gpadjoint.matvec as mvmod

    X, _, params = problem(n=150, d=4)
    h = constrain(params)
    rng = np.random.default_rng(5)
    shape = (150,) if ncols is None else (150, ncols)
    U = jnp.asarray(rng.standard_normal(shape))
    V = jnp.asarray(rng.standard_normal(shape))
    hvjp = getattr(mvmod, f"_{layout}_hypers_vjp")
    fast = hvjp(kernel, tile, False, X, U, V, h)
    slow = hvjp(kernel, tile, False, X, U, V, h, autodiff=True)
    for field in ("lengthscale", "outputscale", "noise"):
        assert rel_err(getattr(fast, field), getattr(slow, field)) < 1e-10, field


@pytest.mark.parametrize("symmetric", [False, True])
def test_blocked_backend_really_tiles(monkeypatch, symmetric):
    # prove the blocked path ran: count the distance tiles it traces; the symmetric layout's
    # tile is a strip of h + 1 = 3 tiles (nb = 4, h = 2), the rows layout's all 100 columns
    import gpadjoint.matvec as mvmod
    import gpadjoint.tiles as tiles

    calls = []
    real = tiles.tile_sq_dist

    def counting(A, B, *a):
        calls.append((A.shape, B.shape))
        return real(A, B, *a)

    monkeypatch.setattr(tiles, "tile_sq_dist", counting)
    monkeypatch.setattr(mvmod, "tile_sq_dist", counting)
    mvmod._blocked_mv_fn.cache_clear()
    X, _, params = problem(n=100)
    be = make_backend("blocked", "rbf", tile=32, symmetric=symmetric)
    out = be.matvec(X, jnp.ones(100), constrain(params))
    mvmod._blocked_mv_fn.cache_clear()
    assert calls == [((32, 3), (96, 3) if symmetric else (100, 3))]  # one traced tile
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
    # posterior="cg": the CG posterior's exact variance is the path under test (auto would
    # take the exact posterior at this size)
    m = GPRegressor(backend="blocked", estimator="slq", epochs=0, variance="exact",
                    posterior="cg", random_state=0).fit(Xtr, ytr)
    before = gpred._var_exact_batch._cache_size()
    outs = [m.predict(Xtr[:9], return_std=True)[1] for _ in range(3)]
    assert gpred._var_exact_batch._cache_size() == before + 1  # three calls, one compile
    assert np.array_equal(outs[0], outs[2])


def test_unknown_backend_and_auto_choice():
    with pytest.raises(ValueError, match="choose one of dense, stored, blocked, keops"):
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


# --- stored: K built once by row tiles, VJP from the stored K and the blocked tiles ------------


@pytest.mark.parametrize("kernel,dtype,ncols", grid(
    ["matern32", "rbf", "matern12", "matern52"], [jnp.float64, jnp.float32], [None, 4]))
def test_stored_matches_dense_reference_on_uneven_n(kernel, dtype, ncols):
    # n = 203 with tile 64: four row tiles, the last one padded (K is stored as 256 x 203)
    check_backend("stored", kernel, dtype, ncols, n=203, tile=64)
    # and against dense_cov itself (value and every VJP), as the blocked pass is compared
    X, _, params = problem(n=203, d=3, dtype=dtype)
    h = constrain(params)
    V = jnp.asarray(np.random.default_rng(4).standard_normal((203, 3)), dtype)
    U = jnp.asarray(np.random.default_rng(5).standard_normal((203, 3)), dtype)
    be = make_backend("stored", kernel, tile=64)
    out, vjp = jax.vjp(lambda V, h: be.matvec(X, V, h), V, h)
    ref, vjp_ref = jax.vjp(lambda V, h: dense_cov(kernel, X, h) @ V, V, h)
    assert out.dtype == dtype and rel_err(out, ref) < RTOL[dtype]
    for a, b in zip(jax.tree.leaves(vjp(U)), jax.tree.leaves(vjp_ref(U))):
        assert rel_err(a, b) < RTOL[dtype]


def test_stored_cov_has_an_exact_diagonal_and_pads_rows():
    from gpadjoint.matvec import stored_cov

    X, _, params = problem(n=203, d=3)
    h = constrain(params)
    K = stored_cov("matern12", 64, X, h)
    assert K.shape == (256, 203)
    # self-distances exactly 0 (as the blocked tiles): the diagonal is s2 to the last bit
    assert np.array_equal(np.diag(np.asarray(K[:203])), np.full(203, float(h.outputscale)))
    Kd = dense_cov("matern12", X, h) - h.noise * jnp.eye(203)
    assert rel_err(K[:203], Kd) < 1e-13


def _temp_bytes(name, n=1500, d=3):
    X, _, params = problem(n=n, d=d)
    h = constrain(params)
    V = jnp.ones((n, 4))
    U = jnp.asarray(np.random.default_rng(0).standard_normal((n, 4)))
    be = make_backend(name, "matern32", tile=128)
    f = jax.value_and_grad(lambda V, h: jnp.sum(U * be.matvec(X, V, h)), argnums=(0, 1))
    mem = jax.jit(f).lower(V, h).compile().memory_analysis()
    if mem is None or not hasattr(mem, "temp_size_in_bytes"):
        pytest.skip("this JAX/XLA reports no memory analysis of a compiled function")
    return mem.temp_size_in_bytes


def test_stored_value_and_gradient_holds_one_n_by_n_array():
    # K itself (padded to 1536 x 1500 rows) is the only n x n buffer: no cotangent of K, no
    # Kbar or G as the dense backend's VJP forms; the dense backend shows the check can fail
    n = 1500
    one = n * n * 8
    assert _temp_bytes("stored") < 1.5 * one
    assert _temp_bytes("dense") > 2 * one


def test_choose_backend_dense_stored_blocked_by_memory(monkeypatch):
    import gpadjoint.matvec as mvmod

    gib = 1024**3
    monkeypatch.setattr(mvmod, "available_memory_bytes", lambda: 10 * gib)
    n = int((1.5 * gib / 8) ** 0.5)  # 1.5 GiB of float64: within 20 % of 10 GiB
    name, why = choose_backend(n, jnp.float64, on_gpu=False)
    assert name == "dense" and "within 20%" in why
    n = int((5 * gib / 8) ** 0.5)  # 5 GiB: above 20 %; with the working memory within 90 %
    assert mvmod.stored_need_bytes(n, 8) <= 0.9 * 10 * gib
    name, why = choose_backend(n, jnp.float64, on_gpu=False)
    assert name == "stored" and "within 90%" in why and "K stored once" in why
    name, _ = choose_backend(n, jnp.float64, on_gpu=True)  # stored is a CPU choice
    assert name in ("keops", "blocked")
    n = int((7 * gib / 8) ** 0.5)  # 7 GiB: stored in one dimension, blocked in twenty, where
    # the gradient's (tile, n, d) temporaries no longer fit beside K
    assert choose_backend(n, jnp.float64, d=1, on_gpu=False)[0] == "stored"
    name, why = choose_backend(n, jnp.float64, d=20, on_gpu=False)
    assert name == "blocked" and "more than 90%" in why
    assert mvmod.stored_need_bytes(n, 8, d=20) > 0.9 * 10 * gib


def test_stored_refuses_a_mesh_and_mixed_precision():
    from gpadjoint.matvec import Backend

    with pytest.raises(ValueError, match="'stored' holds K on one device.*'blocked' or 'dense'"):
        make_backend("stored", "rbf", mesh=object())
    X, _, params = problem(n=20)
    with pytest.raises(ValueError, match="'stored' holds K on one device"):
        Backend("stored", "rbf", mesh=object()).operator(X, constrain(params))
    with pytest.raises(ValueError, match="blocked backend only"):
        make_backend("stored", "rbf", precision="mixed")


def test_stored_operator_is_stable_and_K_gets_no_gradient():
    # the same mv for the same settings (jitted callers take it as a static argument), and K
    # enters without gradient: the hyperparameters' cotangent comes through the custom VJP only
    be = make_backend("stored", "matern32", tile=32)
    X, _, params = problem(n=40)
    h = constrain(params)
    (mv1, args1), (mv2, _) = be.operator(X, h), be.operator(X, h)
    assert mv1 is mv2 and args1[0].shape == (64, 40)
    g = jax.grad(lambda K: jnp.sum(mv1(jnp.ones(40), K, X, h)))(args1[0])
    assert not np.any(np.asarray(g))


@pytest.mark.slow  # two loss compiles (~30 s); the mv-level check above is in the fast suite
def test_stored_loss_gradient_adds_K_alone_to_the_blocked_one():
    # through the whole SLQ + CG loss (the Lanczos and CG adjoints take vjps of mv with respect
    # to every operator argument, K included), stored's compiled value+gradient holds K and
    # what blocked holds, no cotangent of K: its symbolic zero stays symbolic
    from gpadjoint.mll import neg_mll
    from gpadjoint.settings import MLLConfig

    n = 1500
    X, y, params = problem(n=n)
    key = jax.random.PRNGKey(0)

    def temp(name):
        be = make_backend(name, "matern32")
        f = jax.value_and_grad(lambda p: neg_mll(p, X, y, key, backend=be,
                                                 config=MLLConfig(estimator="slq"))[0])
        mem = jax.jit(f).lower(params).compile().memory_analysis()
        if mem is None or not hasattr(mem, "temp_size_in_bytes"):
            pytest.skip("this JAX/XLA reports no memory analysis of a compiled function")
        return mem.temp_size_in_bytes

    assert temp("stored") - temp("blocked") < 1.2 * n * n * 8
