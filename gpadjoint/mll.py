r"""The negative log-marginal likelihood per datum, by SLQ + preconditioned CG.

Stage 5 (logdet / solve -> **mll** -> trainer).

    neg_mll(theta) = -log p(y | theta) / n
                   = [ (y - mu)^T K^{-1} (y - mu) + log det K + n log(2 pi) ] / (2 n)

with K = s2 k(X/l, X/l) + sigma2 I, log det K from stochastic Lanczos quadrature
(:mod:`gpadjoint.logdet`, gradient by the Lanczos adjoint) and the quadratic term from CG
preconditioned by a rank-r pivoted Cholesky (:mod:`gpadjoint.solve`, implicit gradient).
One call gives a value whose gradient (``jax.value_and_grad``) is the exact gradient of *this*
estimator: the probes are drawn from the key passed in, so value and gradient share them.

:func:`neg_mll_exact` is the dense Cholesky reference (O(n^3)), used by tests and as the common
accurate evaluator of the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from .kernels import NOISE_FLOOR, Params, constrain, cross_cov, dense_cov
from .logdet import rademacher, slq_logdet
from .matvec import Backend
from .solve import cg, inv_quad, make_preconditioner, pivoted_cholesky


@dataclass(frozen=True)
class MLLConfig:
    """Settings of the estimator (all explicit, hashable, static under jit).

    Attributes:
        num_probes: Rademacher probes for SLQ (p).
        lanczos_depth: Lanczos steps per probe (k).
        precond_rank: pivoted-Cholesky rank of the CG preconditioner (0 = none).
        cg_tol: CG stops when |y - K x| / |y| <= cg_tol ...
        cg_min_iter: ... and at least this many iterations ran ...
        cg_max_iter: ... or after this many.
        noise_floor: lower bound added to the softplus noise (variance units).

    """

    num_probes: int = 10
    lanczos_depth: int = 10
    precond_rank: int = 15
    cg_tol: float = 1e-2
    cg_min_iter: int = 10
    cg_max_iter: int = 1000
    noise_floor: float = NOISE_FLOOR

    def __post_init__(self):
        for name in ("num_probes", "lanczos_depth", "cg_max_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("precond_rank", "cg_min_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.cg_tol, (int, float)) and self.cg_tol > 0):
            raise ValueError(f"cg_tol must be a positive number, got {self.cg_tol!r}")
        if not (isinstance(self.noise_floor, (int, float)) and self.noise_floor >= 0):
            raise ValueError(f"noise_floor must be >= 0, got {self.noise_floor!r}")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Names of all settings."""
        return tuple(f.name for f in fields(cls))


def neg_mll(
    params: Params,
    X: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    backend: Backend,
    config: MLLConfig = MLLConfig(),
    probes: jax.Array | None = None,
    x0: jax.Array | None = None,
):
    """-log p(y | theta) / n (per datum, 2 pi constant included), estimated by SLQ + PCG.

    Args:
        params: unconstrained :class:`~gpadjoint.kernels.Params` (dtype of X).
        X: (n, d) inputs.
        y: (n,) targets.
        key: PRNG key for the probes (fixed within one evaluation).
        backend: matvec engine (:func:`gpadjoint.matvec.make_backend`).
        config: :class:`MLLConfig`.
        probes: optional explicit (n, p) probe block replacing the Rademacher draw; the
            estimator is (1/p) sum_i |z_i|^2 e_1^T log(T_i) e_1, so sqrt(n) times the n unit
            vectors with depth n gives log det K exactly.
        x0: optional warm start for CG (e.g. the previous step's solution).

    Returns:
        (value, aux) with aux a dict of diagnostics: ``logdet``, ``quad`` (y^T K^-1 y),
        ``cg_iterations``, ``cg_residual`` (relative), ``alpha`` (K^-1 (y - mu), no gradient).

    """
    n = X.shape[0]
    hypers = constrain(params, config.noise_floor)
    r = y - params.mean
    mv, args = backend.operator(X, hypers)

    if probes is None:
        probes = rademacher(key, n, config.num_probes, X.dtype)
    # Ritz values of K can never be below sigma2; round-off (float32) can push them there.
    lower = 0.5 * lax.stop_gradient(hypers.noise)
    logdet = slq_logdet(mv, probes, *args, depth=min(config.lanczos_depth, n), lower=lower)

    h0 = jax.tree.map(lax.stop_gradient, hypers)
    precond = None
    if config.precond_rank > 0:
        rank = min(config.precond_rank, n)
        L = pivoted_cholesky(
            lambda i: cross_cov(backend.kernel, lax.dynamic_slice_in_dim(X, i, 1), X, h0)[0],
            jnp.full((n,), h0.outputscale, X.dtype),
            rank,
        )
        precond = make_preconditioner(L, h0.noise)
    solver = partial(
        _cg_solver, tol=config.cg_tol, min_iter=config.cg_min_iter, max_iter=config.cg_max_iter
    )
    quad, alpha, info = inv_quad(mv, r, *args, solver=solver, solver_args=(precond, x0))
    value = 0.5 * (quad + logdet + n * math.log(2 * math.pi)) / n
    aux = {
        "logdet": lax.stop_gradient(logdet),
        "quad": lax.stop_gradient(quad),
        "cg_iterations": info.iterations,
        "cg_residual": info.residual[0],
        "alpha": alpha,
    }
    return value, aux


def _cg_solver(mv, b, args, solver_args, *, tol, min_iter, max_iter):
    precond, x0 = solver_args
    return cg(mv, b, *args, precond=precond, tol=tol, min_iter=min_iter, max_iter=max_iter, x0=x0)


def neg_mll_exact(
    params: Params, X: jax.Array, y: jax.Array, *, kernel: str, noise_floor: float = NOISE_FLOOR
) -> jax.Array:
    """Dense Cholesky reference of -log p(y | theta) / n (O(n^2) memory, O(n^3) time)."""
    n = X.shape[0]
    K = dense_cov(kernel, X, constrain(params, noise_floor))
    Lc = jnp.linalg.cholesky(K)
    r = y - params.mean
    z = jax.scipy.linalg.solve_triangular(Lc, r, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(Lc)))
    return 0.5 * (jnp.dot(z, z) + logdet + n * math.log(2 * math.pi)) / n
