"""One accurate evaluator of the training loss, to compare fitted hyperparameters fairly.

Every training method reports its own stochastic estimate of -log p(y | theta) / n (SLQ here,
mBCG trace estimates in GPyTorch). To compare two fits like with like, :func:`exact_loss`
evaluates the same quantity for given hyperparameters with one accurate method:

* ``"cholesky"``: float64 dense Cholesky, the kernel matrix built row block by row block
  straight into one preallocated array and factorised in place by :func:`blocked_cholesky`
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

from .kernels import Hypers, cross_cov

__all__ = ["exact_loss", "exact_point", "exact_scale_gradient", "choose_method"]


# The most the SLQ fallback's CG solve may leave out of the loss, per datum (its probe standard
# error at 64 probes is ~1e-4 on the KEGG sets; the table compares losses to 1e-4).
QUAD_LOSS_ERROR = 1e-7


def _available_bytes() -> int:
    from .matvec import available_memory_bytes

    return available_memory_bytes()


def choose_method(n: int, memory_fraction: float = 0.7) -> tuple[str, str]:
    """Pick ``cholesky`` when one float64 n x n array fits in ``memory_fraction`` of memory.

    The factorisation is in place, so besides that array it needs one block of rows (block x n)
    and the process itself: 0.7 leaves room for both and lets protein (n = 41 157, 12.6 GiB)
    and keggdirected (43 945, 14.4 GiB) be scored exactly on a 24 GiB machine.
    """
    need = 8 * n * n
    avail = _available_bytes()
    if need <= memory_fraction * avail:
        return "cholesky", f"K needs {need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available"
    return (
        "slq",
        f"K would need {need / 2**30:.1f} GiB, more than {memory_fraction:.0%} of "
        f"{avail / 2**30:.1f} GiB available",
    )


def _as_hypers(lengthscale, outputscale, noise) -> Hypers:
    return Hypers(
        lengthscale=jnp.asarray(np.asarray(lengthscale, np.float64).reshape(-1)),
        outputscale=jnp.asarray(float(outputscale), jnp.float64),
        noise=jnp.asarray(float(noise), jnp.float64),
    )


def _checked(X, y, lengthscale, outputscale, noise, mean, noise_above: float):
    """float64 X and residual y - mean with their shapes checked, and positive hyperparameters."""
    X = np.asarray(X, np.float64)
    r = np.asarray(y, np.float64) - float(mean)
    n = X.shape[0]
    if X.ndim != 2 or r.shape != (n,):
        raise ValueError(f"X must be (n, d) and y (n,); got {X.shape} and {r.shape}")
    h = _as_hypers(lengthscale, outputscale, noise)
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
    out["loss"] = _loss(out, n)
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
    L, z, out = _cholesky_whiten(X, r, h, kernel, block)
    alpha = _backward_substitution(L, z, block)
    Xj = jnp.asarray(X)
    cross = jax.jit(lambda A: cross_cov(kernel, A, Xj, h))
    mu = np.empty(len(Xt))
    var = np.empty(len(Xt))
    for i in range(0, len(Xt), block):
        Ks = np.asarray(cross(jnp.asarray(Xt[i : i + block])))  # (m, n)
        mu[i : i + block] = float(mean) + Ks @ alpha
        V = _forward_substitution(L, Ks.T, block)  # L^-1 K(X, X*) for this batch
        var[i : i + block] = float(h.outputscale) - np.sum(V * V, axis=0) + float(h.noise)
    return out | {"loss": _loss(out, X.shape[0]), "mean": mu, "var": var,
                  "seconds": time.perf_counter() - t0}


def _loss(out: dict, n: int) -> float:
    """-log p(y) / n from log det K and y^T K^-1 y, 2 pi included."""
    return 0.5 * (out["quad"] + out["logdet"] + n * math.log(2 * math.pi)) / n


def _factor(X, h: Hypers, kernel: str, block: int) -> np.ndarray:
    """K = s2 k(X/l, X/l) + noise I built row block by row block, then factorised in place."""
    n = X.shape[0]
    K = np.empty((n, n), np.float64)
    Xj = jnp.asarray(X)
    rows = jax.jit(lambda A: cross_cov(kernel, A, Xj, h))
    for i in range(0, n, block):
        K[i : i + block] = np.asarray(rows(Xj[i : i + block]))
    K[np.diag_indices(n)] += float(h.noise)
    return blocked_cholesky(K, block)


def _cholesky_whiten(X, r, h: Hypers, kernel: str, block: int):
    """(L, z = L^-1 r, {"logdet", "quad"}) from one blocked factorisation of K."""
    L = _factor(X, h, kernel, block)
    z = _forward_substitution(L, r, block)
    return L, z, {"logdet": 2.0 * float(np.sum(np.log(np.diag(L)))), "quad": float(z @ z)}


def _cholesky_loss(X, r, h: Hypers, kernel: str, block: int) -> dict:
    return _cholesky_whiten(X, r, h, kernel, block)[2]


def blocked_cholesky(A: np.ndarray, block: int = 2048) -> np.ndarray:
    """Factorise the symmetric positive definite ``A`` in place: its lower triangle becomes L.

    Right-looking and blocked: LAPACK only ever sees ``block``-sized pieces and the trailing
    updates are numpy matrix products. One LAPACK call on the whole matrix (scipy's
    ``cholesky``) segfaulted at n = 36 000 (kin40k) on this machine, which lost two 50-minute
    benchmark runs: its 32-bit LAPACK indexing cannot address the 10 GB array. Memory stays one
    n x n array plus an (n, block) panel. The strict upper triangle is left as it was.
    """
    import scipy.linalg as sla

    n = A.shape[0]
    for k in range(0, n, block):
        e = min(k + block, n)
        try:
            A[k:e, k:e] = sla.cholesky(A[k:e, k:e], lower=True, check_finite=False)
        except np.linalg.LinAlgError as err:
            raise np.linalg.LinAlgError(
                f"the float64 kernel matrix is not positive definite (pivot block {k}:{e}): "
                f"{err}") from err
        if e == n:
            break
        L11 = A[k:e, k:e]
        # panel: L21 = A21 L11^-T
        A[e:, k:e] = sla.solve_triangular(L11, A[e:, k:e].T, lower=True,
                                          check_finite=False).T
        L21 = A[e:, k:e]
        # trailing update of the lower triangle, one column block at a time
        for j in range(e, n, block):
            je = min(j + block, n)
            A[j:, j:je] -= L21[j - e :] @ L21[j - e : je - e].T
    return A


def _forward_substitution(L: np.ndarray, r: np.ndarray, block: int) -> np.ndarray:
    """Solve L z = r (r: (n,) or (n, m)) for the lower triangle of L, block row by block row."""
    import scipy.linalg as sla

    n = L.shape[0]
    z = np.empty(r.shape, np.float64)
    for k in range(0, n, block):
        e = min(k + block, n)
        rhs = r[k:e] - L[k:e, :k] @ z[:k]
        z[k:e] = sla.solve_triangular(L[k:e, k:e], rhs, lower=True, check_finite=False)
    return z


def _backward_substitution(L: np.ndarray, z: np.ndarray, block: int) -> np.ndarray:
    """Solve L^T a = z for the lower triangle of L, block row by block row from the end."""
    import scipy.linalg as sla

    n = L.shape[0]
    a = np.empty(n, np.float64)
    for k in range(((n - 1) // block) * block, -1, -block):
        e = min(k + block, n)
        rhs = z[k:e] - L[e:, k:e].T @ a[e:]
        a[k:e] = sla.solve_triangular(L[k:e, k:e], rhs, lower=True, trans="T",
                                      check_finite=False)
    return a


def _trace_of_inverse(L: np.ndarray, block: int) -> float:
    """tr(K^-1) = ||L^-1||_F^2, one block of columns of L^-1 at a time (n^3 / 6 flops)."""
    import scipy.linalg as sla

    n = L.shape[0]
    total = 0.0
    for c in range(0, n, block):
        ce = min(c + block, n)
        Z = np.empty((n - c, ce - c), np.float64)  # rows c: of L^-1[:, c:ce]; above c it is 0
        for i in range(c, n, block):
            ie = min(i + block, n)
            rhs = np.eye(ce - c) if i == c else -(L[i:ie, c:i] @ Z[: i - c])
            Z[i - c : ie - c] = sla.solve_triangular(L[i:ie, i:ie], rhs, lower=True,
                                                     check_finite=False)
        total += float(np.sum(Z * Z))
    return total


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
    L = _factor(X, h, kernel, block)
    alpha = _backward_substitution(L, _forward_substitution(L, r, block), block)
    tr_inv = _trace_of_inverse(L, block)
    del L
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
