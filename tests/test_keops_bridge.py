"""KeOps bridge: values and VJPs against the dense JAX reference, under jit/scan/vmap.

Compilation budget: every distinct (kernel, dtype, d, width) costs a matvec formula and every
(kernel, dtype, d, gradient bucket) a hyperparameter-gradient formula, ~10 s of g++ each on a
cold cache. This file uses d = 3 throughout, and few widths: 1, 3 and 4 columns (gradient
buckets 1 and 4), in float64 for all kernels and float32 for matern32 and matern12, plus one
24-column matern32 float64 case (gradient bucket 32) for the split dot product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpadjoint import keops_bridge as kb
from gpadjoint.kernels import KERNEL_NAMES, Hypers, cross_cov, dense_cov

D = 3


def _skip_without_keops():
    ok, why = kb.keops_available()
    if not ok:
        pytest.skip(f"KeOps unavailable: {why}")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _problem(n, m, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.normal(size=(n, D)), dtype)
    shape = (n,) if m is None else (n, m)
    V = jnp.asarray(rng.normal(size=shape), dtype)
    U = jnp.asarray(rng.normal(size=shape), dtype)
    h = Hypers(
        jnp.asarray([0.7, 1.3, 2.0], dtype), jnp.asarray(1.5, dtype), jnp.asarray(0.1, dtype)
    )
    return X, V, U, h


def _as64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _check_against_dense(kernel, X, V, U, h, tol):
    """Value and VJP in (V, hypers) of the KeOps matvec vs autodiff of dense float64 K @ V."""
    before = dict(kb.CALL_COUNTS)
    y, vjp = jax.vjp(lambda V, h: kb.keops_matvec(X, V, h, kernel), V, h)
    ct = vjp(U)
    # The reference runs in float64 on the same (possibly float32) inputs: the exact answer.
    X64, V64, U64, h64 = _as64((X, V, U, h))
    y0, vjp0 = jax.vjp(lambda V, h: dense_cov(kernel, X64, h) @ V, V64, h64)
    ct0 = vjp0(U64)
    assert y.dtype == X.dtype and y.shape == V.shape
    assert _rel(y, y0) <= tol
    names = ["V", "lengthscale", "outputscale", "noise"]
    for name, a, b in zip(names, jax.tree.leaves(ct), jax.tree.leaves(ct0), strict=True):
        assert a.dtype == X.dtype and a.shape == b.shape, name
        assert _rel(a, b) <= tol, (name, _rel(a, b))
    # KeOps really ran: forward + V-bar matvecs and one gradient reduction.
    assert kb.CALL_COUNTS["kv"] >= before["kv"] + 2
    assert kb.CALL_COUNTS["grad"] >= before["grad"] + 1


def test_column_bucket():
    assert [kb.column_bucket(m) for m in (1, 2, 3, 5, 11, 16, 17, 256, 257, 600)] == [
        1, 2, 3, 5, 11, 16, 32, 256, 512, 768,
    ]
    assert [kb.grad_bucket(m) for m in (1, 2, 3, 5, 11, 16, 17, 44, 48, 101, 256, 257, 600)] == [
        1, 2, 4, 8, 16, 16, 32, 48, 48, 112, 256, 512, 768,
    ]  # fmt: skip


def test_bad_inputs_raise():
    X, V, _, h = _problem(10, 2, jnp.float64)
    with pytest.raises(ValueError, match="unknown kernel"):
        kb.keops_matvec(X, V, h, "cauchy")
    with pytest.raises(ValueError, match="V must have shape"):
        kb.keops_matvec(X, V[:5], h, "rbf")
    with pytest.raises(ValueError, match="X must be"):
        kb.keops_matvec(X.astype(jnp.int32), V, h, "rbf")


@pytest.mark.keops
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_float64_matches_dense(kernel):
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)
    _check_against_dense(kernel, X, V, U, h, tol=1e-8)


@pytest.mark.keops
@pytest.mark.parametrize(("kernel", "m"), [("matern32", None), ("matern12", 3)])
def test_float32_matches_dense(kernel, m):
    # n ~ 2000: long enough sums for float32 accumulation error to show if it were there.
    _skip_without_keops()
    X, V, U, h = _problem(2000, m, jnp.float32, seed=1)
    _check_against_dense(kernel, X, V, U, h, tol=1e-4)


@pytest.mark.keops
def test_matern12_duplicate_points_finite_gradient():
    # Duplicated rows give r = 0 off the diagonal as well: k'(r2) = -exp(-r)/(2r) is infinite
    # there, but its product with (x_d - x'_d)^2 must be 0. Check against central differences.
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)
    X = jnp.concatenate([X, X[:20]])
    V = jnp.concatenate([V, V[:20]])
    U = jnp.concatenate([U, U[:20]])

    def loss(ls):
        return jnp.sum(U * kb.keops_matvec(X, V, h._replace(lengthscale=ls), "matern12"))

    g = jax.grad(loss)(h.lengthscale)
    assert np.all(np.isfinite(g))
    eps = 1e-6
    fd = [
        (loss(h.lengthscale.at[i].add(eps)) - loss(h.lengthscale.at[i].add(-eps))) / (2 * eps)
        for i in range(D)
    ]
    assert _rel(g, fd) <= 1e-6


@pytest.mark.keops
def test_jit_scan_fori_loop():
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)

    def run(V, h, matvec):
        v, _ = jax.lax.scan(lambda v, _: (matvec(v, h) / 5.0, None), V, None, length=3)
        v = jax.lax.fori_loop(0, 2, lambda i, v: matvec(v, h) / 5.0, v)
        return jnp.sum(U * v)

    def keops(v, h):
        return kb.keops_matvec(X, v, h, "rbf")

    def dense(v, h):
        return dense_cov("rbf", X, h) @ v

    assert _rel(jax.jit(run, static_argnums=2)(V, h, keops), run(V, h, dense)) <= 1e-10
    # Reverse mode through scan: the custom VJP is traced into the jitted backward pass.
    # (fori_loop with static bounds lowers to scan, so it is differentiable too.)
    g = jax.jit(jax.grad(run, (0, 1)), static_argnums=2)(V, h, keops)
    g0 = jax.grad(run, (0, 1))(V, h, dense)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) <= 1e-8


@pytest.mark.keops
def test_vmap_over_vectors_is_one_reduction():
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)
    K = dense_cov("rbf", X, h)
    before = kb.CALL_COUNTS["kv"]
    Y = jax.jit(jax.vmap(lambda v: kb.keops_matvec(X, v, h, "rbf"), in_axes=1, out_axes=1))(V)
    assert kb.CALL_COUNTS["kv"] == before + 1  # 3 vectors folded into one 3-column call
    assert _rel(Y, K @ V) <= 1e-12


@pytest.mark.keops
def test_vmap_over_hypers_and_cotangents():
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)
    scales = jnp.asarray([0.5, 2.0])
    hb = jax.vmap(lambda s: h._replace(outputscale=s))(scales)
    Y = jax.vmap(lambda hh: kb.keops_matvec(X, V, hh, "rbf"))(hb)
    for i in range(2):
        hi = jax.tree.map(lambda a, i=i: a[i], hb)
        assert _rel(Y[i], dense_cov("rbf", X, hi) @ V) <= 1e-12
    # Batched cotangents: the gradient reduction runs once per batch element.
    _, vjp = jax.vjp(lambda h: kb.keops_matvec(X, V, h, "rbf"), h)
    cts = jax.vmap(vjp)(jnp.stack([U, 2.0 * U]))[0]
    one = vjp(U)[0]
    for a, b in zip(jax.tree.leaves(cts), jax.tree.leaves(one), strict=True):
        assert _rel(a[1], 2.0 * b) <= 1e-12 and _rel(a[0], b) <= 1e-12


@pytest.mark.keops
def test_hypers_only_gradient_under_jit():
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)
    before = dict(kb.CALL_COUNTS)
    g = jax.jit(jax.grad(lambda h: jnp.sum(U * kb.keops_matvec(X, V, h, "rbf"))))(h)
    # Under jit the unused forward value and V-bar matvecs are dead code: one reduction runs.
    assert kb.CALL_COUNTS["kv"] == before["kv"] and kb.CALL_COUNTS["grad"] == before["grad"] + 1
    g0 = jax.grad(lambda h: jnp.sum(U * (dense_cov("rbf", X, h) @ V)))(h)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) <= 1e-8


@pytest.mark.keops
def test_dtype_mismatch_is_cast_to_x_dtype():
    _skip_without_keops()
    X, V, U, h = _problem(300, 3, jnp.float64)
    V32, h32 = V.astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32), h)
    y, vjp = jax.vjp(lambda V, h: kb.keops_matvec(X, V, h, "rbf"), V32, h32)
    assert y.dtype == jnp.float64
    assert _rel(y, dense_cov("rbf", X, _as64(h32)) @ V32.astype(jnp.float64)) <= 1e-12
    v_bar, h_bar = vjp(U)
    assert v_bar.dtype == jnp.float32 and h_bar.noise.dtype == jnp.float32


@pytest.mark.keops
def test_cross_matvec():
    _skip_without_keops()
    X, V, _, h = _problem(300, 3, jnp.float64)
    Xs = X[:50] + 0.1
    Y = jax.jit(lambda Xs, V: kb.keops_cross_matvec(Xs, X, V, h, "rbf"))(Xs, V)
    assert Y.shape == (50, 3)
    assert _rel(Y, cross_cov("rbf", Xs, X, h) @ V) <= 1e-10


def _low_rank_pair(n, m, r, seed=0, noise=0.0):
    """u, v (n, m) whose product u v^T has rank r (plus optional tiny full-rank noise)."""
    rng = np.random.default_rng(seed)
    A, B = rng.normal(size=(n, r)), rng.normal(size=(n, r))
    u, v = A @ rng.normal(size=(r, m)), B @ rng.normal(size=(r, m))
    return u + noise * rng.normal(size=u.shape), v + noise * rng.normal(size=v.shape)


def test_compress_weight_keeps_the_product():
    u, v = _low_rank_pair(500, 40, 5, noise=1e-12)
    a, b = kb.compress_weight(u, v, 8 * 2.0**-53 * 1e3)
    # rank 5: the 8-column bucket it will run in keeps the 8 leading singular values
    assert a.shape == b.shape == (500, 8)
    assert _rel(a @ b.T, u @ v.T) <= 1e-10
    # rank 40 of 80 columns: kept to the next step of 16 (48), not the next power of two
    u4, v4 = _low_rank_pair(500, 80, 40, noise=1e-12)
    a4, b4 = kb.compress_weight(u4, v4, 8 * 2.0**-53 * 1e3)
    assert a4.shape == b4.shape == (500, 48)
    assert _rel(a4 @ b4.T, u4 @ v4.T) <= 1e-10
    # full rank: nothing to gain, the inputs come back untouched
    rng = np.random.default_rng(1)
    u2, v2 = rng.normal(size=(500, 40)), rng.normal(size=(500, 40))
    a2, b2 = kb.compress_weight(u2, v2, 1e-7)
    assert a2 is u2 and b2 is v2
    # a zero weight becomes one zero column; disabled (rtol 0) returns the inputs
    z, _ = kb.compress_weight(np.zeros((50, 9)), v2[:50, :9], 1e-7)
    assert z.shape == (50, 1) and not z.any()
    assert kb.compress_weight(u, v, 0.0)[0] is u
    # float32 in, float32 out (the SVD runs in float64)
    a3, _ = kb.compress_weight(u.astype(np.float32), v.astype(np.float32), 1e-6)
    assert a3.dtype == np.float32 and a3.shape[1] <= 8


@pytest.mark.keops
def test_gradient_with_a_low_rank_weight_is_compressed_and_exact(monkeypatch):
    """A 40-column cotangent whose weight has rank 4 runs as a 4-column reduction (bucket 4,
    already compiled for float64 d = 3: exactly rank 4, so no more singular values to keep)
    and still gives the dense float64 gradient."""
    _skip_without_keops()
    # a cut well above the float64 round-off of the rank-4 product's zero singular values
    monkeypatch.setitem(kb.VJP_RANK_RTOL, "float64", 1e-10)
    X, _, _, h = _problem(400, 3, jnp.float64)
    u, v = _low_rank_pair(400, 40, 4, seed=3)
    U, V = jnp.asarray(u), jnp.asarray(v)
    before = dict(kb.CALL_COUNTS)
    g = jax.jit(jax.grad(lambda h: jnp.sum(U * kb.keops_matvec(X, V, h, "matern32"))))(h)
    assert kb.CALL_COUNTS["grad"] == before["grad"] + 1
    assert kb.CALL_COUNTS["grad_columns"] == before["grad_columns"] + 4
    g0 = jax.grad(lambda h: jnp.sum(U * (dense_cov("matern32", X, h) @ V)))(h)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) <= 1e-9


def test_dot_formula_splits_into_independent_pieces():
    assert kb._dot(8) == "(u|v)"
    pieces = kb._dot(20).split("+")
    assert pieces == ["(Extract(u,0,8)|Extract(v,0,8))", "(Extract(u,8,8)|Extract(v,8,8))",
                      "(Extract(u,16,4)|Extract(v,16,4))"]


@pytest.mark.keops
def test_wide_full_rank_weight_uses_the_split_dot_and_matches_dense():
    """A 24-column cotangent of full rank (bucket 32: four 8-wide dots, 8 zero-padded columns)
    gives the dense float64 gradient; the split only reorders the sum."""
    _skip_without_keops()
    X, V, U, h = _problem(400, 24, jnp.float64, seed=5)
    before = dict(kb.CALL_COUNTS)
    g = jax.grad(lambda h: jnp.sum(U * kb.keops_matvec(X, V, h, "matern32")))(h)
    assert kb.CALL_COUNTS["grad_columns"] == before["grad_columns"] + 24
    g0 = jax.grad(lambda h: jnp.sum(U * (dense_cov("matern32", X, h) @ V)))(h)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) <= 1e-10


@pytest.mark.keops
def test_keops_runs_on_the_device_the_arrays_live_on(monkeypatch):
    # the choice, without a GPU: JAX's platform decides, and a GPU platform with a CPU-only
    # pykeops is refused instead of quietly running KeOps on the CPU
    assert kb.keops_device("cpu", keops_gpu=True) == "CPU"
    assert kb.keops_device("gpu", keops_gpu=True) == "GPU"
    assert kb.keops_device("cuda", keops_gpu=True) == "GPU"
    with pytest.raises(RuntimeError, match="no GPU support"):
        kb.keops_device("gpu", keops_gpu=False)
    # and the reductions receive that choice: record what the host callbacks are given
    seen = []
    real = kb._host_kv

    def spy(kernel, device, *a):
        seen.append(device)
        return real(kernel, "CPU", *a)  # this machine can only run the CPU build

    monkeypatch.setattr(kb, "_host_kv", spy)
    monkeypatch.setattr(kb, "keops_device", lambda: "GPU")
    X = jnp.asarray(np.random.default_rng(0).standard_normal((20, 2)))
    h = Hypers(jnp.ones(2), jnp.asarray(1.0), jnp.asarray(0.1))
    out = kb.keops_matvec(X, jnp.ones(20), h, "rbf")
    assert seen == ["GPU"]
    ref = dense_cov("rbf", X, h) @ jnp.ones(20)
    np.testing.assert_allclose(out, ref, rtol=1e-10)
