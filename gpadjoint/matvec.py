"""Kernel matvec backends: V -> K(theta) V.

Data flow: kernels -> **matvec** -> lanczos -> logdet/solve -> mll.

Four interchangeable engines behind one interface (:class:`Backend`):

``dense``
    Materialise K once per evaluation, then matmul. Fastest on a CPU while n^2 fits in memory:
    every matvec of the evaluation reuses K instead of recomputing its entries
    (results/bench_matvec.csv compares the backends).
``blocked``
    Pure JAX over row tiles (``lax.map``), O(n * tile) memory, with a custom VJP that
    recomputes tiles in the backward pass instead of storing them.
``stored``
    The noise-free part of K built once per operator (per hyperparameter value), by row tiles,
    and reused by every matvec as one product; its VJP takes the V cotangent from the same
    stored K and the hyperparameters' from the blocked symmetric tiles, so value+gradient
    holds one n x n array where ``dense`` holds several. For a CPU when K fits but its
    cotangent does not.
``keops``
    pykeops reductions (``keops_bridge``), O(n) memory; the path for GPUs and for n too large
    to store.

The algorithms downstream (lanczos, solve) never see kernels: they get an *operator* ``(mv, args)``
with ``mv(V, *args) = K V``, so that their custom VJPs can return cotangents for ``args``.
For ``dense`` the args are ``(K,)`` (one build per evaluation, reused by every matvec, and JAX
carries the cotangent of K back to theta); for ``stored`` ``(K, X, hypers)`` (K without gradient;
see :func:`_stored_mv_fn`); for the other two ``(X, hypers)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .kernels import PROFILE_DERIVATIVES, Hypers, dense_cov, get_profile, sq_diff_basis
from .tiles import (
    finish_hbar,
    hbar_tile,
    hbar_tile_autodiff,
    kv_tile,
    pad_rows,
    profile_entries,
    symmetric_operator,
    tile_sq_dist,
)

BACKENDS = ("dense", "stored", "blocked", "keops")
# "full": kernel entries in the working dtype; "mixed": entries in float32, everything else in
# the working dtype (gpadjoint.tiles).
PRECISIONS = ("full", "mixed")

# Bytes of one n x n kernel matrix we are willing to hold for the dense backend, as a fraction of
# available memory (K, its cotangent and one temporary live at once in value+gradient).
DENSE_MEMORY_FRACTION = 0.2
# The stored backend on a CPU holds K once for a whole value+gradient (the hyperparameter
# cotangent comes from recomputed tiles, so there is no n x n cotangent); beside K the
# evaluation's working memory grows with n: the symmetric VJP's tile temporaries (about three
# (tile, n, d) arrays) and the rank-r preconditioner's factors (about two (n, r) arrays), plus a
# fixed runtime share. Stored is chosen when all of that fits in STORED_MEMORY_FRACTION of the
# available memory; results/bench_memory_stored.csv holds the peak resident memory measured
# against this estimate.
STORED_MEMORY_FRACTION = 0.9
STORED_RUNTIME_BYTES = 1024**3


def stored_need_bytes(n: int, itemsize: int, *, d: int = 1, tile: int = 128,
                      rank: int = 1000) -> int:
    """Estimated peak bytes of one stored-backend SLQ value+gradient at n rows (see above)."""
    work = n * (3 * min(tile, n) * d + 2 * min(rank, n)) * itemsize
    return n * n * itemsize + work + STORED_RUNTIME_BYTES


@dataclass(frozen=True)
class Backend:
    """A matvec engine for one training set. Build with :func:`make_backend`.

    Attributes:
        name: "dense", "stored", "blocked" or "keops".
        kernel: kernel name (see :data:`gpadjoint.kernels.PROFILES`).
        tile: rows per tile for ``blocked`` (memory ~ tile * n), and for ``stored``'s build and
            hyperparameter VJP. Speed only: a smaller tile keeps each (tile, n) block in cache,
            a larger one makes fewer, bigger products (``[model] tile``;
            results/bench_matvec.csv records the tile of each run).
        mesh: a 1-D ``jax.sharding.Mesh`` (:func:`gpadjoint.sharding.make_mesh`) to split the
            rows over, or None for the single-device path (:mod:`gpadjoint.sharding`).
        symmetric: ``blocked`` evaluates each off-diagonal kernel tile once and applies it to
            both sides (the strip layout below); False: row tiles against all columns.
        precision: "full" (kernel entries in the working dtype) or "mixed" (entries in
            float32, products, sums and Krylov vectors in the working dtype; :data:`PRECISIONS`).

    """

    name: str
    kernel: str
    tile: int = 128
    mesh: Any = None
    symmetric: bool = True
    precision: str = "full"

    def operator(self, X, hypers: Hypers) -> tuple[Callable, tuple]:
        """Return ``(mv, args)`` with ``mv(V, *args) == K(hypers) @ V`` for V (n,) or (n, m)."""
        if self.mesh is not None:
            return self._sharded_operator(X, hypers)
        if self.name == "dense":
            return _dense_mv, (dense_cov(self.kernel, X, hypers),)
        if self.name == "stored":
            # K from stop-gradient hypers: its cotangent is a symbolic zero end to end (the
            # hyperparameters' comes through the custom VJP's hypers argument instead)
            K = stored_cov(self.kernel, self.tile, X, jax.tree.map(lax.stop_gradient, hypers))
            return _stored_mv_fn(self.kernel, self.tile), (K, X, hypers)
        if self.name == "blocked":
            return _blocked_mv_fn(self.kernel, self.tile, self.symmetric,
                                  self.precision == "mixed"), (X, hypers)
        if self.name == "keops":
            return _keops_mv_fn(self.kernel), (X, hypers)
        raise ValueError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")

    def _sharded_operator(self, X, hypers: Hypers) -> tuple[Callable, tuple]:
        from . import sharding as sh

        if self.name == "stored":
            raise ValueError(_STORED_MESH_ERROR)
        X = jax.lax.with_sharding_constraint(X, sh.row_sharding(self.mesh))
        if self.name == "dense":
            return sh.sharded_dense_mv(self.mesh), (sh.sharded_dense_cov(
                self.mesh, self.kernel, X, hypers),)
        if self.name == "blocked":
            return sh.sharded_blocked_mv(self.mesh, self.kernel, self.tile,
                                         self.precision == "mixed"), (X, hypers)
        if self.name == "keops":
            return sh.sharded_keops_operator(self.mesh, self.kernel, X, hypers)
        raise ValueError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")

    def matvec(self, X, V, hypers: Hypers):
        """K(hypers) @ V, differentiable in V and hypers."""
        mv, args = self.operator(X, hypers)
        return mv(V, *args)


def make_backend(name: str, kernel: str, *, tile: int = 128, mesh=None, symmetric: bool = True,
                 precision: str = "full") -> Backend:
    """Validate names and return a :class:`Backend` (no silent substitution).

    ``mesh``: a device mesh to shard the rows over (:func:`gpadjoint.sharding.make_mesh`).
    ``symmetric``, ``precision``: the blocked pass's layout and kernel-entry precision
    (:class:`Backend`); "mixed" exists for ``blocked`` only. ``stored`` runs on one device
    (no ``mesh``).

    Raises:
        ValueError: for an unknown backend or kernel name, ``stored`` with a mesh, or
            "mixed" with a backend other than ``blocked``.
        RuntimeError: if ``keops`` is requested and pykeops cannot run here.

    """
    get_profile(kernel)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of rows, got {tile}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown kernel precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    if precision == "mixed" and name != "blocked":
        raise ValueError(f"kernel precision 'mixed' exists for the blocked backend only, not "
                         f"{name!r}; choose --backend blocked or precision 'full'")
    if name == "stored" and mesh is not None:
        raise ValueError(_STORED_MESH_ERROR)
    if name == "keops":
        from .keops_bridge import keops_available

        ok, why = keops_available()
        if not ok:
            raise RuntimeError(
                f"backend 'keops' was requested but pykeops cannot run here: {why}. "
                "Install a C++ compiler and the Python headers (apt-get install g++ python3-dev), "
                "or choose --backend dense/stored/blocked/auto."
            )
    return Backend(name, kernel, tile, mesh, symmetric, precision)


def available_memory_bytes() -> int:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo; 8 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3


def choose_backend(n: int, dtype, *, d: int = 1, tile: int = 128, rank: int = 1000,
                   on_gpu: bool | None = None) -> tuple[str, str]:
    """Pick a backend by problem size and memory; returns ``(name, reason)``.

    Rule: dense when an n x n matrix fits in ``DENSE_MEMORY_FRACTION`` of available memory (a
    matmul with a prebuilt K beats recomputing its entries at every matvec); on a CPU, stored
    when K and the evaluation's working memory (:func:`stored_need_bytes` for ``d`` features,
    ``tile`` rows per tile and a rank-``rank`` preconditioner) fit in
    ``STORED_MEMORY_FRACTION``; otherwise KeOps on a GPU, and on a CPU the blocked JAX matvec,
    which was faster than KeOps's CPU reductions (both in results/bench_matvec.csv). KeOps on a
    CPU is only chosen when asked for. Called once per fit, by
    :func:`gpadjoint.plan.make_plan`: the answer depends on the memory available at the time.
    """
    if on_gpu is None:
        on_gpu = jax.default_backend() == "gpu"
    itemsize = jnp.dtype(dtype).itemsize
    need = n * n * itemsize
    avail = available_memory_bytes()
    gib = 1024**3
    if need <= DENSE_MEMORY_FRACTION * avail:
        return "dense", (
            f"K needs {need / gib:.2f} GiB, within {DENSE_MEMORY_FRACTION:.0%} of the "
            f"{avail / gib:.1f} GiB available"
        )
    stored = stored_need_bytes(n, itemsize, d=d, tile=tile, rank=rank)
    if not on_gpu and stored <= STORED_MEMORY_FRACTION * avail:
        return "stored", (
            f"K needs {need / gib:.2f} GiB, more than {DENSE_MEMORY_FRACTION:.0%} of the "
            f"{avail / gib:.1f} GiB available, and with the evaluation's working memory "
            f"{stored / gib:.1f} GiB, within {STORED_MEMORY_FRACTION:.0%}: K stored once, its "
            "gradient from recomputed tiles"
        )
    if on_gpu:
        from .keops_bridge import keops_available

        ok, why = keops_available()
        if ok:
            return "keops", f"K needs {need / gib:.1f} GiB (too large to store); KeOps on GPU"
        return "blocked", f"K needs {need / gib:.1f} GiB; KeOps unavailable ({why})"
    return "blocked", (
        f"K needs {need / gib:.1f} GiB and with the evaluation's working memory "
        f"{stored / gib:.1f} GiB, more than {STORED_MEMORY_FRACTION:.0%} of the "
        f"{avail / gib:.1f} GiB available; blocked JAX is faster than KeOps on a CPU"
    )


# --- dense ------------------------------------------------------------------------------------


def _dense_mv(V, K):
    return K @ V


# --- stored -----------------------------------------------------------------------------------

_STORED_MESH_ERROR = ("backend 'stored' holds K on one device and does not shard; with several "
                      "devices use backend 'blocked' or 'dense'")


@functools.partial(jax.jit, static_argnums=(0, 1))
def stored_cov(kernel: str, tile: int, X, hypers: Hypers):
    """Return the noise-free ``s2 k(X/l, X/l)`` as one (nb * t, n) array, t = min(tile, n).

    Rows beyond n (the last tile's padding) hold the kernel against zero rows and are never
    read by the product's first n rows. Built tile by tile (``lax.map``) with the blocked
    tiles' distance (:func:`gpadjoint.tiles.tile_sq_dist`, self-distances exactly 0), so the
    build needs no n x n temporary beyond K. Not differentiable: pass stop-gradient hypers.
    """
    n = X.shape[0]
    t = min(tile, n)
    prof = get_profile(kernel)
    Xs = X / hypers.lengthscale
    Xsp = pad_rows(Xs, t)
    nb = Xsp.shape[0] // t

    def rows(s):
        At = lax.dynamic_slice_in_dim(Xsp, s, t)
        return hypers.outputscale * prof(tile_sq_dist(At, Xs, s))

    return lax.map(rows, jnp.arange(nb) * t).reshape(nb * t, n)


@functools.cache
def _stored_mv_fn(kernel: str, tile: int) -> Callable:
    """Build ``mv(V, K, X, hypers) = K V + noise V`` for K from :func:`stored_cov`.

    Custom VJP: V's cotangent ``K U + noise U`` (K symmetric), the hyperparameters' from the
    blocked symmetric tiles (:func:`_sym_hypers_vjp`, which adds the noise's ``<U, V>``), X's
    zero, and K's ``None``: a symbolic zero, so no n x n cotangent is ever formed (K came from
    stop-gradient hypers, so nothing upstream wants one). Cached per settings, as
    :func:`_blocked_mv_fn`.
    """
    hvjp = functools.partial(_sym_hypers_vjp, kernel, tile, False)

    def apply(V, K, noise):
        n = V.shape[0]
        return (K @ V)[:n] + noise * V

    @jax.custom_vjp
    def mv(V, K, X, hypers):
        return apply(V, K, hypers.noise)

    def fwd(V, K, X, hypers):
        return apply(V, K, hypers.noise), (V, K, X, hypers)

    def bwd(res, U):
        V, K, X, hypers = res
        return apply(U, K, hypers.noise), None, jnp.zeros_like(X), hvjp(X, U, V, hypers)

    mv.defvjp(fwd, bwd)
    return mv


# --- blocked ----------------------------------------------------------------------------------
#
# Two layouts of the same tiles (gpadjoint.tiles):
#
# rows       Row tile I against all n columns: every kernel pair evaluated twice (K_ij and K_ji),
#            in the forward pass and again in the VJP. Kept as the reference and for comparison.
# symmetric  Row tile I against the strip of tiles I, I+1, ..., I+h (mod nb), h = nb // 2: with
#            the tiles on a circle every unordered pair of tiles {I, J} lies in exactly one strip
#            (for even nb the pair at distance h lies in two, and each of those strips applies it
#            to its own rows only). An off-diagonal tile K_IJ is evaluated once and used twice:
#            K_IJ V_J for rows I, K_IJ^T V_I for rows J; in the VJP its weight carries both
#            orientations, U_I V_J^T + V_I U_J^T. About half the kernel evaluations of ``rows``,
#            the same products; every strip has the same static shape (t, (h + 1) t), taken as one
#            slice of the inputs with their first h tiles appended again.


@functools.cache
def _keops_mv_fn(kernel: str) -> Callable:
    """``mv(V, X, hypers)`` by KeOps; one function per kernel (see :func:`_blocked_mv_fn`)."""
    from .keops_bridge import keops_matvec

    def mv(V, X, hypers):
        return keops_matvec(X, V, hypers, kernel)

    return mv


@functools.cache
def _blocked_mv_fn(kernel: str, tile: int, symmetric: bool = False, mixed: bool = False):
    """Build ``mv(V, X, hypers)`` computing K V tile by tile with a memory-light custom VJP.

    ``symmetric``: the strip layout (each kernel pair once); otherwise row tiles against all
    columns. ``mixed``: kernel entries in float32, products and sums in the working dtype
    (:mod:`gpadjoint.tiles`). Cached per settings: callers pass ``mv`` to jitted functions as a
    static argument, so the same settings must give the same function object, or every call
    would recompile.
    """
    prof = get_profile(kernel)
    if symmetric:
        fwd = functools.partial(_sym_forward, prof, tile, mixed)
        hvjp = functools.partial(_sym_hypers_vjp, kernel, tile, mixed)
    else:
        fwd = functools.partial(_rows_forward, prof, tile, mixed)
        hvjp = functools.partial(_rows_hypers_vjp, kernel, tile, mixed)
    return symmetric_operator(fwd, hvjp)


def _rows_forward(prof, tile, mixed, V, X, hypers):
    n = X.shape[0]
    t = min(tile, n)
    Xs = X / hypers.lengthscale
    Xsp = pad_rows(Xs, t)
    nb = Xsp.shape[0] // t

    def rows(s):  # rows [s, s + t) of K V; padded rows beyond n are dropped below
        Xt = lax.dynamic_slice_in_dim(Xsp, s, t)
        return kv_tile(prof, Xt, Xs, V, hypers.outputscale, s, mixed)

    blocks = lax.map(rows, jnp.arange(nb) * t)
    out = blocks.reshape((nb * t,) + V.shape[1:])[:n]
    return out + hypers.noise * V


def _rows_hypers_vjp(kernel, tile, mixed, X, U, V, hypers, autodiff=False):
    """Cotangent of hypers for <U, K(hypers) V> = sum_ij (U_i . V_j) K_ij, row tile by row tile.

    Per tile the weight W = U_t V^T, then :func:`gpadjoint.tiles.hbar_tile` (closed form:
    rbf, matern32, matern52) or, for matern12 or with ``autodiff``, autodiff through the tile
    (which keeps and revisits several (t, n) intermediates; the closed form reads the tile once).
    """
    n, d = X.shape
    U, V = U.reshape(n, -1), V.reshape(n, -1)
    t = min(tile, n)
    Up = pad_rows(U, t)  # padded rows of U are zero, so padded rows of W add nothing
    starts = jnp.arange(Up.shape[0] // t) * t
    if kernel in PROFILE_DERIVATIVES and not autodiff:
        prof, dprof = get_profile(kernel), PROFILE_DERIVATIVES[kernel]
        Xs = X / hypers.lengthscale
        Xsp = pad_rows(Xs, t)
        B = sq_diff_basis(Xs)  # once, outside the tile loop

        def body(acc, s):
            W = lax.dynamic_slice_in_dim(Up, s, t) @ V.T
            At = lax.dynamic_slice_in_dim(Xsp, s, t)
            return jax.tree.map(jnp.add, acc, hbar_tile(prof, dprof, At, Xs, B, W, s, mixed)), None

        zero = (jnp.zeros((), X.dtype), jnp.zeros((d,), X.dtype))
        (s2bar, quad), _ = lax.scan(body, zero, starts)
        return finish_hbar(hypers, s2bar, quad, jnp.sum(U * V))
    Xp = pad_rows(X, t)

    def body_ad(acc, s):
        W = lax.dynamic_slice_in_dim(Up, s, t) @ V.T
        At = lax.dynamic_slice_in_dim(Xp, s, t)
        return jax.tree.map(jnp.add, acc, hbar_tile_autodiff(kernel, At, X, W, hypers, s)), None

    hbar, _ = lax.scan(body_ad, jax.tree.map(jnp.zeros_like, hypers), starts)
    return hbar._replace(noise=hbar.noise + jnp.sum(U * V))


def _sym_layout(n, tile):
    """(t, nb, h, hT): tile rows, tiles, strip length in tiles - 1, transposed tiles per strip."""
    t = min(tile, n)
    nb = -(-n // t)
    return t, nb, nb // 2, (nb - 1) // 2


def _wrap(A, t, h):
    # A padded to whole tiles, then its first h tiles again: strip I is one slice from row I t
    Ap = pad_rows(A, t)
    return jnp.concatenate([Ap, Ap[: h * t]], axis=0)


def _sym_forward(prof, tile, mixed, V, X, hypers):
    n = X.shape[0]
    t, nb, h, hT = _sym_layout(n, tile)
    L = (h + 1) * t
    V2 = V.reshape(n, -1)
    Xe, Ve = _wrap(X / hypers.lengthscale, t, h), _wrap(V2, t, h)

    def body(out, s):
        At = lax.dynamic_slice_in_dim(Xe, s, t)
        R2 = tile_sq_dist(At, lax.dynamic_slice_in_dim(Xe, s, L), 0)
        Kt = hypers.outputscale * profile_entries(prof, R2, mixed)  # (t, L): tiles I .. I+h
        # materialise the tile once: left to itself XLA fuses its elementwise producer into
        # both products below, evaluating every kernel entry twice
        Kt = lax.optimization_barrier(Kt)
        rows = Kt @ lax.dynamic_slice_in_dim(Ve, s, L)
        # (V_I^T K)^T, not K^T V_I: XLA's CPU dot copies a transposed (t, L) operand first
        cols = (lax.dynamic_slice_in_dim(Ve, s, t).T @ Kt[:, t : (hT + 1) * t]).T
        out = lax.dynamic_update_slice_in_dim(out, lax.dynamic_slice_in_dim(out, s, t) + rows, s, 0)
        old = lax.dynamic_slice_in_dim(out, s + t, hT * t)
        return lax.dynamic_update_slice_in_dim(out, old + cols, s + t, 0), None

    zero = jnp.zeros(((nb + h) * t, V2.shape[1]), V2.dtype)
    out_e, _ = lax.scan(body, zero, jnp.arange(nb) * t)
    out = out_e[: nb * t].at[: h * t].add(out_e[nb * t :])  # fold the wrapped tiles back
    return out[:n].reshape(V.shape) + hypers.noise * V


def _sym_hypers_vjp(kernel, tile, mixed, X, U, V, hypers, autodiff=False):
    """As :func:`_rows_hypers_vjp` over the strips of the symmetric layout.

    Strip I's weight is ``[U_I | V_I] [V_c | m o U_c]^T`` (c: the strip's columns, m = 1 on the
    tiles whose transpose the strip applies, 0 on its diagonal tile and on a tile at distance
    nb / 2), the sum of both orientations of each pair it holds. matern12 ignores ``mixed``
    here: its VJP is autodiff through a full-precision tile.
    """
    n, d = X.shape
    U2, V2 = U.reshape(n, -1), V.reshape(n, -1)
    t, nb, h, hT = _sym_layout(n, tile)
    L = (h + 1) * t
    mask = jnp.zeros((L, 1), X.dtype).at[t : (hT + 1) * t].set(1.0)
    Ue, Ve = _wrap(U2, t, h), _wrap(V2, t, h)
    starts = jnp.arange(nb) * t

    def weight(s):
        left = jnp.concatenate([lax.dynamic_slice_in_dim(Ue, s, t),
                                lax.dynamic_slice_in_dim(Ve, s, t)], axis=1)
        right = jnp.concatenate([lax.dynamic_slice_in_dim(Ve, s, L),
                                 mask * lax.dynamic_slice_in_dim(Ue, s, L)], axis=1)
        return left @ right.T

    if kernel in PROFILE_DERIVATIVES and not autodiff:
        prof, dprof = get_profile(kernel), PROFILE_DERIVATIVES[kernel]
        Xe = _wrap(X / hypers.lengthscale, t, h)
        Be = sq_diff_basis(Xe)

        def body(acc, s):
            At, Bs = lax.dynamic_slice_in_dim(Xe, s, t), lax.dynamic_slice_in_dim(Xe, s, L)
            Bb = lax.dynamic_slice_in_dim(Be, s, L)
            part = hbar_tile(prof, dprof, At, Bs, Bb, weight(s), 0, mixed)
            return jax.tree.map(jnp.add, acc, part), None

        zero = (jnp.zeros((), X.dtype), jnp.zeros((d,), X.dtype))
        (s2bar, quad), _ = lax.scan(body, zero, starts)
        return finish_hbar(hypers, s2bar, quad, jnp.sum(U * V))
    Xe = _wrap(X, t, h)

    def body_ad(acc, s):
        At, Bs = lax.dynamic_slice_in_dim(Xe, s, t), lax.dynamic_slice_in_dim(Xe, s, L)
        return jax.tree.map(jnp.add, acc, hbar_tile_autodiff(kernel, At, Bs, weight(s), hypers,
                                                             0)), None

    hbar, _ = lax.scan(body_ad, jax.tree.map(jnp.zeros_like, hypers), starts)
    return hbar._replace(noise=hbar.noise + jnp.sum(U * V))
