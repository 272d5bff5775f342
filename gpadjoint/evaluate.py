"""One accurate evaluator of the training loss, to compare fitted hyperparameters fairly.

Every training method reports its own stochastic estimate of -log p(y | theta) / n (SLQ here,
mBCG trace estimates in GPyTorch). To compare two fits like with like, :func:`exact_loss`
evaluates the same quantity for given hyperparameters with one accurate method:

* ``"cholesky"``: float64 dense Cholesky, the kernel matrix built row block by row block
  straight into one preallocated array and factorised in place (:mod:`gpadjoint.exact`)
  (one n x n float64 array of memory: 1.8 GB at n = 15 000, 10 GB at n = 36 000);
* ``"slq"``: when that array does not fit, float64 SLQ with many probes and deep Lanczos on the
  blocked backend, split by a rank-200 pivoted-Cholesky preconditioner (log det P exact, SLQ
  on P^-1/2 K P^-1/2 only), reported with its standard error over probes and with how much
  the estimate still moved over the second half of the Lanczos steps; y^T K^-1 y by CG run
  until its bound on the loss error is ``QUAD_LOSS_ERROR`` per datum (``quad_loss_bound``).

``method="auto"`` takes Cholesky when the array fits in ``memory_fraction`` of available memory.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import exact
from .kernels import Hypers, cross_cov

__all__ = ["exact_loss", "exact_point", "exact_scale_gradient", "choose_method"]


# The most the SLQ fallback's CG solve may leave out of the loss, per datum (its probe standard
# error at 64 probes is ~1e-4 on the KEGG sets; the table compares losses to 1e-4).
QUAD_LOSS_ERROR = 1e-7


def choose_method(n: int, memory_fraction: float = 0.7) -> tuple[str, str]:
    """Pick ``cholesky`` when one float64 n x n array fits in ``memory_fraction`` of memory.

    :func:`gpadjoint.exact.factor_fits`: 0.7 lets protein (n = 41 157, 12.6 GiB) and
    keggdirected (43 945, 14.4 GiB) be scored exactly on a 24 GiB machine.
    """
    fits, reason = exact.factor_fits(n, memory_fraction)
    return ("cholesky" if fits else "slq"), reason


def _checked(X, y, lengthscale, outputscale, noise, mean, noise_above: float):
    """float64 X and residual y - mean with their shapes checked, and positive hyperparameters."""
    X = np.asarray(X, np.float64)
    r = np.asarray(y, np.float64) - float(mean)
    n = X.shape[0]
    if X.ndim != 2 or r.shape != (n,):
        raise ValueError(f"X must be (n, d) and y (n,); got {X.shape} and {r.shape}")
    h = exact.as_hypers(lengthscale, outputscale, noise)
    if not (float(h.noise) > noise_above and float(h.outputscale) > 0
            and bool(jnp.all(h.lengthscale > 0))):
        above = f" (noise above {noise_above})" if noise_above else ""
        raise ValueError(f"hyperparameters must be positive{above}; got {h}")
    return X, r, h


def exact_loss(
    X,
    y,
    *,
    kernel: str,
    lengthscale,
    outputscale: float,
    noise: float,
    mean: float,
    method: str = "auto",
    block: int = 2048,
    num_probes: int = 64,
    lanczos_depth: int = 100,
    precond_rank: int = 200,
    seed: int = 0,
) -> dict:
    """-log p(y | theta) / n (2 pi constant included) for constrained hyperparameters.

    Hyperparameters are in the units of ``X`` and ``y`` as given (pass the standardised data a
    method trained on together with the values it fitted there).

    Returns:
        dict with ``loss``, ``method``, ``reason``, ``seconds``, ``logdet``, ``quad`` and, for
        ``slq``, ``loss_se`` (standard error over probes), ``loss_depth_change`` (|estimate at
        the full depth - estimate at half of it|, in the loss's units), ``num_probes``,
        ``lanczos_depth``, ``precond_rank`` and ``cg_residual``.

    """
    X, r, h = _checked(X, y, lengthscale, outputscale, noise, mean, noise_above=0.0)
    n = X.shape[0]
    if method == "auto":
        method, reason = choose_method(n)
    elif method in ("cholesky", "slq"):
        reason = "requested"
    else:
        raise ValueError(f"unknown method {method!r}; choose 'auto', 'cholesky' or 'slq'")
    t0 = time.perf_counter()
    if method == "cholesky":
        out = _cholesky_loss(X, r, h, kernel, block)
    else:
        out = _slq_loss(X, r, h, kernel, num_probes, lanczos_depth, seed, precond_rank)
    out["loss"] = exact.neg_mll_from_terms(out["quad"], out["logdet"], n)
    out.update(method=method, reason=reason, seconds=time.perf_counter() - t0)
    return out


def exact_point(
    X,
    y,
    X_test,
    *,
    kernel: str,
    lengthscale,
    outputscale: float,
    noise: float,
    mean: float,
    block: int = 2048,
) -> dict:
    """Return the exact loss and the exact posterior predictive at ``X_test``, by one Cholesky.

    Float64 throughout and blocked like :func:`exact_loss`'s ``"cholesky"`` (one n x n array;
    works where one LAPACK call on the whole matrix does not), so that any hyperparameters,
    however ill-conditioned K is there, can be scored at full n where the array fits.

    Returns:
        dict with ``loss`` (-log p(y | theta) / n, 2 pi included), ``logdet``, ``quad``,
        ``mean`` and ``var`` (predictive mean and variance at ``X_test``, noise included, in
        the units of ``y``) and ``seconds``.

    """
    X, r, h = _checked(X, y, lengthscale, outputscale, noise, mean, noise_above=0.0)
    Xt = np.asarray(X_test, np.float64)
    if Xt.ndim != 2 or Xt.shape[1] != X.shape[1]:
        raise ValueError(f"X_test must be (m, {X.shape[1]}) like X; got {Xt.shape}")
    t0 = time.perf_counter()
    f = exact.factor(X, y, h, mean, kernel=kernel, block=block)
    mu, var = exact.posterior(f, Xt)
    return {"loss": f.loss, "logdet": f.logdet, "quad": f.quad, "mean": mu, "var": var,
            "seconds": time.perf_counter() - t0}


def _cholesky_loss(X, r, h: Hypers, kernel: str, block: int) -> dict:
    f = exact.factor(X, r, h, 0.0, kernel=kernel, block=block)
    return {"logdet": f.logdet, "quad": f.quad}


# the blocked linear algebra lives in gpadjoint.exact; these names are kept for callers
blocked_cholesky = exact.cholesky_in_place


def exact_scale_gradient(
    X, y, *, kernel: str, lengthscale, outputscale: float, noise: float, mean: float,
    noise_floor: float = 1e-4, block: int = 2048,
) -> dict:
    """Exact gradient of -log p(y | theta) / n in the output scale, the noise and the mean.

    In float64 by one blocked Cholesky of K = s k~ + noise I (one n x n array, as
    :func:`exact_loss`), alpha = K^-1 (y - mean) and tr(K^-1) = ||L^-1||_F^2 (a further n^3 / 6
    flops, no second array): with r^T alpha and |alpha|^2,

    * d/ds = [(n - noise tr K^-1) - (r^T alpha - noise |alpha|^2)] / (2 s n),
    * d/dnoise = [tr K^-1 - |alpha|^2] / (2 n),
    * d/dmean = -sum(alpha) / n.

    The lengthscales' gradient needs K^-1 itself, a second array, so it is left out: at the
    sizes this is for (protein, n = 41 157) that does not fit. Also returned in the raw
    coordinates Adam steps in (softplus outputscale, softplus of noise above ``noise_floor``,
    the mean itself), as ``raw_outputscale``, ``raw_noise``, ``mean``.
    """
    X, r, h = _checked(X, y, lengthscale, outputscale, noise, mean, noise_above=noise_floor)
    n = X.shape[0]
    s, sig = float(outputscale), float(noise)
    t0 = time.perf_counter()
    f = exact.factor(X, y, h, mean, kernel=kernel, block=block)
    alpha = f.alpha
    tr_inv = exact.trace_of_inverse(f.L, block)
    del f
    ra, aa = float(r @ alpha), float(alpha @ alpha)
    g_s = ((n - sig * tr_inv) - (ra - sig * aa)) / (2.0 * s * n)
    g_noise = (tr_inv - aa) / (2.0 * n)
    g_mean = -float(np.sum(alpha)) / n
    return {
        "outputscale": g_s,
        "noise": g_noise,
        "mean_value": g_mean,
        # d softplus(x)/dx = sigmoid(x) = 1 - exp(-softplus(x))
        "raw_outputscale": g_s * -math.expm1(-s),
        "raw_noise": g_noise * -math.expm1(-(sig - noise_floor)),
        "mean": g_mean,
        "trace_inverse": tr_inv,
        "seconds": time.perf_counter() - t0,
    }


def _quad_gap(mv, args, r, xk, noise: float) -> float:
    """Bound on r^T K^-1 r - r^T x_k for an approximate solve x_k, valid in floating point.

    With the true residual s = r - K x_k (one more matvec, not CG's recurrence) and e = K^-1 s,
    r^T K^-1 r - r^T x_k = (x_k + e)^T s = x_k^T s + s^T K^-1 s, and 0 <= s^T K^-1 s <= |s|^2 /
    lambda_min(K) <= |s|^2 / noise. x_k^T s vanishes for CG in exact arithmetic (Galerkin
    orthogonality) but not in floating point, where |s|^2 / noise alone was exceeded at the
    1e-8 level.
    """
    s = r - mv(xk[:, None], *args)[:, 0]
    return abs(float(xk @ s)) + float(s @ s) / noise


def _slq_loss(X, r, h: Hypers, kernel: str, num_probes: int, depth: int, seed: int,
              precond_rank: int, max_block_bytes: float = 2 * 2**30) -> dict:
    from .lanczos import lanczos
    from .logdet import (
        half_inverse_factors,
        logdet_quadform,
        masked_quadform,
        preconditioned_mv,
        rademacher,
    )
    from .matvec import make_backend
    from .solve import cg, make_preconditioner, pivoted_cholesky

    n = X.shape[0]
    depth = min(depth, n)
    Xj = jnp.asarray(X)
    mv, args = make_backend("blocked", kernel).operator(Xj, h)
    # A pivoted-Cholesky preconditioner P = L L^T + noise I serves both halves: log det K =
    # log det P (exact, r x r) + log det(P^-1/2 K P^-1/2), whose spectrum clusters near 1, so
    # SLQ on it has a far smaller probe spread and converges in fewer Lanczos steps; and the
    # CG solve for y^T K^-1 y.
    L = pivoted_cholesky(
        lambda i: cross_cov(kernel, jax.lax.dynamic_slice_in_dim(Xj, i, 1), Xj, h)[0],
        jnp.full((n,), h.outputscale),
        min(precond_rank, n),
    )
    half, logdet_P, lower = half_inverse_factors(L, h.noise, jnp.float64)
    mvp = preconditioned_mv(mv)
    # Probes in blocks whose Lanczos basis (block x depth x n floats) fits max_block_bytes; each
    # probe's quadrature is an independent sample, so their spread gives the standard error.
    most = max(1, min(num_probes, int(max_block_bytes // (8 * depth * n))))
    block = -(-num_probes // -(-num_probes // most))  # equal blocks, each at most `most`
    run = jax.jit(lambda Z: lanczos(mvp, Z, *args, *half, depth=depth, adjoint=False))

    def quadratures(tri, k):  # |z|^2 e_1^T log(T) e_1 from the leading k x k block of each T
        q = jax.vmap(lambda a, b: masked_quadform(a[:k], b[:k], lower, logdet_quadform))(
            tri.alpha, tri.beta)
        return np.asarray(tri.norm**2 * q)

    key = jax.random.PRNGKey(seed)
    full, half_depth = [], []
    for start in range(0, num_probes, block):
        key, sub = jax.random.split(key)
        tri = run(rademacher(sub, n, min(block, num_probes - start), jnp.float64))
        full.append(quadratures(tri, depth))
        half_depth.append(quadratures(tri, max(1, depth // 2)))
    vals, vals_half = np.concatenate(full), np.concatenate(half_depth)
    P = make_preconditioner(L, h.noise)
    rj = jnp.asarray(r)
    # CG only as far as the loss needs: with e = x - x_k, r^T x_k falls short of r^T K^-1 r by
    # e^T K e <= |r - K x_k|^2 / lambda_min(K) <= (tol |r|)^2 / noise. Ask for at most
    # QUAD_LOSS_ERROR of the loss per datum (0.5 * that / n), never looser than 1e-4 nor
    # tighter than 1e-10. (A fixed 1e-8 took most of keggundirected's 87-minute scoring.)
    rr = float(rj @ rj)
    tol = math.sqrt(2 * QUAD_LOSS_ERROR * n * float(h.noise) / rr) if rr > 0 else 1e-10
    tol = min(max(tol, 1e-10), 1e-4)
    x, info = cg(mv, rj[:, None], *args, precond=P, tol=tol, min_iter=1, max_iter=5000)
    res = float(np.max(np.asarray(info.residual)))
    xk = x[:, 0]
    se_logdet = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else math.inf
    return {
        "logdet": float(logdet_P) + float(np.mean(vals)),
        "quad": float(rj @ xk),
        "loss_se": 0.5 * se_logdet / n,
        # how far the estimate still moved over the second half of the Lanczos steps (per n,
        # the loss's units): a quadrature that has converged moves by much less than loss_se
        "loss_depth_change": 0.5 * abs(float(np.mean(vals) - np.mean(vals_half))) / n,
        "num_probes": int(num_probes),
        "lanczos_depth": int(depth),
        "precond_rank": int(L.shape[1]),
        "cg_residual": res,
        # what the stopped solve can have left out of the loss (per datum): the bound above
        "quad_loss_bound": 0.5 * _quad_gap(mv, args, rj, xk, float(h.noise)) / n,
    }
