"""Lanczos with full reorthogonalisation, and its adjoint VJP against autodiff through the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import problem, rel_err, slow

from gpadjoint.kernels import constrain, dense_cov
from gpadjoint.lanczos import lanczos, tridiag_mask, tridiag_matrix
from gpadjoint.matvec import make_backend


def random_cotangent(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def kernel_operator_fn(backend, X):
    """(V0, params) -> Tridiag, differentiable in both, through the backend's operator."""

    def run(V0, params, adjoint, depth):
        mv, args = backend.operator(X, constrain(params))
        return lanczos(mv, V0, *args, depth=depth, adjoint=adjoint)

    return run


@pytest.mark.parametrize(
    "kernel,backend,depth,m",
    [
        slow("rbf", "dense", 1, 1),
        ("rbf", "dense", 7, 3),
        slow("matern32", "dense", 15, 2),
        slow("matern12", "blocked", 10, 4),
        slow("matern52", "blocked", 25, 1),
    ],
)
def test_adjoint_vjp_equals_autodiff_through_the_loop(kernel, backend, depth, m):
    X, _, params = problem(n=80, d=3)
    be = make_backend(backend, kernel, tile=32)
    run = kernel_operator_fn(be, X)
    V0 = jnp.asarray(np.random.default_rng(5).standard_normal((80, m)))
    out = run(V0, params, True, depth)
    ref = run(V0, params, False, depth)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-12
    cot = random_cotangent(out, seed=depth)

    def loss(V0, params, adjoint):
        o = run(V0, params, adjoint, depth)
        return sum(jnp.sum(a * b) for a, b in zip(o, cot))

    g = jax.grad(loss, argnums=(0, 1))(V0, params, True)
    g_ref = jax.grad(loss, argnums=(0, 1))(V0, params, False)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-6


def test_full_depth_reproduces_the_matrix_and_q_is_orthonormal():
    X, _, params = problem(n=60, d=2)
    K = dense_cov("matern32", X, constrain(params))
    v = jnp.asarray(np.random.default_rng(0).standard_normal(60))
    tri = lanczos(lambda V, K: K @ V, v, K, depth=60)
    Q = tri.Q.T  # (n, k)
    assert np.abs(Q.T @ Q - np.eye(60)).max() < 1e-10
    T = tridiag_matrix(tri.alpha, tri.beta)
    assert rel_err(Q @ T @ Q.T, K) < 1e-10
    assert float(tri.beta[-1]) < 1e-8 * float(jnp.linalg.norm(K))


def test_partial_depth_satisfies_the_lanczos_relation():
    X, _, params = problem(n=100, d=3)
    K = dense_cov("rbf", X, constrain(params))
    v = jnp.asarray(np.random.default_rng(1).standard_normal(100))
    tri = lanczos(lambda V, K: K @ V, v, K, depth=12)
    Q = tri.Q.T
    T = tridiag_matrix(tri.alpha, tri.beta)
    resid = K @ Q - Q @ T
    resid = resid.at[:, -1].add(-tri.beta[-1] * tri.q_next)
    assert np.abs(resid).max() < 1e-12
    assert np.abs(Q.T @ Q - np.eye(12)).max() < 1e-12
    assert np.abs(Q.T @ tri.q_next).max() < 1e-12


def test_breakdown_returns_finite_and_correct_values():
    # A has 3 distinct eigenvalues: the Krylov space is exhausted after 3 steps of depth 8
    rng = np.random.default_rng(2)
    U, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    eig = np.repeat([1.0, 2.0, 5.0], 10)
    A = jnp.asarray(U @ np.diag(eig) @ U.T)
    v = jnp.asarray(rng.standard_normal(30))
    mv = lambda V, A: A @ V  # noqa: E731
    tri = lanczos(mv, v, A, depth=8)
    assert all(np.all(np.isfinite(x)) for x in tri)
    assert np.all(np.asarray(tri.beta[2:]) == 0) and float(tri.beta[1]) > 0
    assert np.array_equal(tridiag_mask(tri.beta), [True] * 3 + [False] * 5)
    # the alive 3x3 block carries the exact spectral measure of v: e1^T f(T) e1 = v^T f(A) v/|v|^2
    T3 = tridiag_matrix(tri.alpha[:3], tri.beta[:3])
    lam, V = np.linalg.eigh(T3)
    quad = float(np.sum(V[0] ** 2 * np.log(lam)))
    w = U.T @ np.asarray(v)
    assert quad == pytest.approx(float(np.sum(w**2 * np.log(eig)) / np.sum(w**2)), rel=1e-10)
    cot = random_cotangent(tri, 3)

    def loss(A, adjoint):
        o = lanczos(mv, v, A, depth=8, adjoint=adjoint)
        return sum(jnp.sum(a * b) for a, b in zip(o, cot))

    g = jax.grad(loss)(A, True)
    assert np.all(np.isfinite(g))
    assert rel_err(g, jax.grad(loss)(A, False)) < 1e-6


def test_float32_stays_orthonormal_with_reorthogonalisation():
    X, _, params = problem(n=400, d=3, dtype=jnp.float32)
    K = dense_cov("rbf", X, constrain(params))
    v = jnp.ones(400, jnp.float32)
    tri = lanczos(lambda V, K: K @ V, v, K, depth=40)
    Q = np.asarray(tri.Q, np.float64).T
    assert np.all(np.isfinite(Q))
    assert np.abs(Q.T @ Q - np.eye(40)).max() < 1e-4


def test_depth_must_be_in_range():
    with pytest.raises(ValueError, match="between 1 and n=5"):
        lanczos(lambda V: V, jnp.ones(5), depth=6)
