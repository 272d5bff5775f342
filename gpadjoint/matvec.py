"""Kernel matvec backends: V -> K(theta) V.

Stage 2 of the pipeline (kernels -> **matvec** -> lanczos -> logdet/solve -> mll).

Three interchangeable engines behind one interface (:class:`Backend`):

``dense``
    Materialise K once per evaluation, then matmul. Fastest on a CPU while n^2 fits in memory
    (REFERENCE.md: a matmul with a prebuilt K is ~10x cheaper than any on-the-fly matvec).
``blocked``
    Pure JAX over row tiles (``lax.map``), O(n * tile) memory, with a custom VJP that
    recomputes tiles in the backward pass instead of storing them.
``keops``
    pykeops reductions (``keops_bridge``), O(n) memory; the path for GPUs and for n too large
    to store.

The algorithms downstream (lanczos, solve) never see kernels: they get an *operator* ``(mv, args)``
with ``mv(V, *args) = K V``, so that their custom VJPs can return cotangents for ``args``.
For ``dense`` the args are ``(K,)`` (one build per evaluation, reused by every matvec, and JAX
carries the cotangent of K back to theta); for the other two they are ``(X, hypers)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .kernels import (
    PROFILE_DERIVATIVES,
    Hypers,
    cross_cov,
    dense_cov,
    get_profile,
    sq_diff_basis,
    sq_diff_sums,
    sq_dist,
)

BACKENDS = ("dense", "blocked", "keops")

# Bytes of one n x n kernel matrix we are willing to hold for the dense backend, as a fraction of
# available memory (K, its cotangent and one temporary live at once in value+gradient).
DENSE_MEMORY_FRACTION = 0.2


@dataclass(frozen=True)
class Backend:
    """A matvec engine for one training set. Build with :func:`make_backend`.

    Attributes:
        name: "dense", "blocked" or "keops".
        kernel: kernel name (see :data:`gpadjoint.kernels.PROFILES`).
        tile: rows per tile for ``blocked``. 128 measured fastest from n = 8192 to 36 000 on
            the 2-core CPU (a (tile, n) float32 block then fits the 32 MiB L3): at n = 36 000,
            d = 8, an 11-column matvec took 1.05 s against 1.61 s with 1024 rows.
        mesh: a 1-D ``jax.sharding.Mesh`` (:func:`gpadjoint.sharding.make_mesh`) to split the
            rows over, or None for the single-device path (:mod:`gpadjoint.sharding`).

    """

    name: str
    kernel: str
    tile: int = 128
    mesh: Any = None

    def operator(self, X, hypers: Hypers) -> tuple[Callable, tuple]:
        """Return ``(mv, args)`` with ``mv(V, *args) == K(hypers) @ V`` for V (n,) or (n, m)."""
        if self.mesh is not None:
            return self._sharded_operator(X, hypers)
        if self.name == "dense":
            return _dense_mv, (dense_cov(self.kernel, X, hypers),)
        if self.name == "blocked":
            return _blocked_mv_fn(self.kernel, self.tile), (X, hypers)
        if self.name == "keops":
            return _keops_mv_fn(self.kernel), (X, hypers)
        raise ValueError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")

    def _sharded_operator(self, X, hypers: Hypers) -> tuple[Callable, tuple]:
        from . import sharding as sh

        X = jax.lax.with_sharding_constraint(X, sh.row_sharding(self.mesh))
        if self.name == "dense":
            return sh.sharded_dense_mv(self.mesh), (sh.sharded_dense_cov(
                self.mesh, self.kernel, X, hypers),)
        if self.name == "blocked":
            return sh.sharded_blocked_mv(self.mesh, self.kernel, self.tile), (X, hypers)
        if self.name == "keops":
            return sh.sharded_keops_operator(self.mesh, self.kernel, X, hypers)
        raise ValueError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")

    def matvec(self, X, V, hypers: Hypers):
        """K(hypers) @ V, differentiable in V and hypers."""
        mv, args = self.operator(X, hypers)
        return mv(V, *args)


def make_backend(name: str, kernel: str, *, tile: int = 128, mesh=None) -> Backend:
    """Validate names and return a :class:`Backend` (no silent substitution).

    ``mesh``: a device mesh to shard the rows over (:func:`gpadjoint.sharding.make_mesh`).

    Raises:
        ValueError: for an unknown backend or kernel name.
        RuntimeError: if ``keops`` is requested and pykeops cannot run here.

    """
    get_profile(kernel)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of rows, got {tile}")
    if name == "keops":
        from .keops_bridge import keops_available

        ok, why = keops_available()
        if not ok:
            raise RuntimeError(
                f"backend 'keops' was requested but pykeops cannot run here: {why}. "
                "Install a C++ compiler and the Python headers (apt-get install g++ python3-dev), "
                "or choose --backend dense/blocked/auto."
            )
    return Backend(name, kernel, tile, mesh)


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


def choose_backend(n: int, dtype, *, on_gpu: bool | None = None) -> tuple[str, str]:
    """Pick a backend by problem size and memory; returns ``(name, reason)``.

    Rule (measured on the 2-core CPU, REFERENCE.md): dense when an n x n matrix fits in
    ``DENSE_MEMORY_FRACTION`` of available memory (a matmul with a prebuilt K is 10-100x faster
    than on-the-fly matvecs); otherwise KeOps on a GPU, and on a CPU the blocked JAX matvec,
    which measured 7x faster than KeOps there. KeOps on a CPU is only chosen when asked for.
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
    if on_gpu:
        from .keops_bridge import keops_available

        ok, why = keops_available()
        if ok:
            return "keops", f"K needs {need / gib:.1f} GiB (too large to store); KeOps on GPU"
        return "blocked", f"K needs {need / gib:.1f} GiB; KeOps unavailable ({why})"
    return "blocked", (
        f"K needs {need / gib:.1f} GiB, more than {DENSE_MEMORY_FRACTION:.0%} of the "
        f"{avail / gib:.1f} GiB available; blocked JAX is faster than KeOps on a CPU"
    )


# --- dense ------------------------------------------------------------------------------------


def _dense_mv(V, K):
    return K @ V


# --- blocked ----------------------------------------------------------------------------------


def _pad_rows(A, multiple):
    n = A.shape[0]
    pad = (-n) % multiple
    if pad == 0:
        return A
    return jnp.concatenate([A, jnp.zeros((pad,) + A.shape[1:], A.dtype)], axis=0)


@functools.cache
def _keops_mv_fn(kernel: str) -> Callable:
    """``mv(V, X, hypers)`` by KeOps; one function per kernel (see :func:`_blocked_mv_fn`)."""
    from .keops_bridge import keops_matvec

    def mv(V, X, hypers):
        return keops_matvec(X, V, hypers, kernel)

    return mv


@functools.cache
def _blocked_mv_fn(kernel: str, tile: int) -> Callable:
    """Build ``mv(V, X, hypers)`` computing K V tile by tile with a memory-light custom VJP.

    Cached per (kernel, tile): callers pass ``mv`` to jitted functions as a static argument,
    so the same settings must give the same function object, or every call would recompile.
    """

    def tile_rows(start, Xt, X, V, hypers):
        # rows [start, start+tile) of K V; padded rows beyond n are discarded by the caller
        Kt = cross_cov(kernel, Xt, X, hypers, diag_offset=start)
        return Kt @ V

    def forward(V, X, hypers):
        n = X.shape[0]
        t = min(tile, n)
        Xp = _pad_rows(X, t)
        nb = Xp.shape[0] // t
        starts = jnp.arange(nb) * t
        blocks = lax.map(
            lambda s: tile_rows(s, lax.dynamic_slice_in_dim(Xp, s, t), X, V, hypers), starts
        )
        out = blocks.reshape((nb * t,) + V.shape[1:])[:n]
        return out + hypers.noise * V

    def hypers_vjp(X, U, V, hypers):
        if kernel in PROFILE_DERIVATIVES:
            return _blocked_hypers_vjp(kernel, tile, X, U, V, hypers)
        return _blocked_hypers_vjp_autodiff(tile_rows, tile, X, U, V, hypers)

    return symmetric_operator(forward, hypers_vjp)


def symmetric_operator(forward: Callable, hypers_vjp: Callable) -> Callable:
    """Wrap ``forward(V, X, hypers) = K V`` (K symmetric) as ``mv`` with a memory-light VJP.

    The cotangent of V is ``forward(U, X, hypers)`` (K^T U = K U; dropped as dead code when
    unused), X gets none (inputs are data), and the hyperparameters get
    ``hypers_vjp(X, U, V, hypers)``, the gradient of <U, K(hypers) V>: nothing of K is kept
    for the backward pass. Every backend that never forms K (blocked, KeOps, sharded) uses it.
    """

    @jax.custom_vjp
    def mv(V, X, hypers):
        return forward(V, X, hypers)

    def fwd(V, X, hypers):
        return forward(V, X, hypers), (V, X, hypers)

    def bwd(res, U):
        V, X, hypers = res
        return forward(U, X, hypers), jnp.zeros_like(X), hypers_vjp(X, U, V, hypers)

    mv.defvjp(fwd, bwd)
    return mv


def _blocked_hypers_vjp_autodiff(tile_rows, tile, X, U, V, hypers):
    """Cotangent of hypers for <U, K(hypers) V> by autodiff through each tile (matern12)."""
    n = X.shape[0]
    t = min(tile, n)
    Xp = _pad_rows(X, t)
    Up = _pad_rows(U, t)
    nb = Xp.shape[0] // t

    def body(acc, s):
        Xt = lax.dynamic_slice_in_dim(Xp, s, t)
        Ut = lax.dynamic_slice_in_dim(Up, s, t)
        _, vjp = jax.vjp(lambda h: tile_rows(s, Xt, X, V, h), hypers)
        (g,) = vjp(Ut)
        return jax.tree.map(jnp.add, acc, g), None

    zero = jax.tree.map(jnp.zeros_like, hypers)
    hbar, _ = lax.scan(body, zero, jnp.arange(nb) * t)
    return hbar._replace(noise=hbar.noise + jnp.sum(U * V))


def _blocked_hypers_vjp(kernel, tile, X, U, V, hypers):
    """Cotangent of hypers for <U, K(hypers) V> = sum_ij (U_i . V_j) K_ij, in closed form.

    Per row tile: the weight W = U_t V^T, then one fused elementwise pass giving
    sum W o k(R2) (the output scale's cotangent) and G = W o k'(R2), and the lengthscale terms
    sum_ij G_ij (xs_id - xs_jd)^2 from one (t, n) x (n, 2d + 1) product
    (:func:`gpadjoint.kernels.sq_diff_sums`), as the dense backend's hand-written VJP. Autodiff
    through the tile instead keeps and revisits several (t, n) intermediates: at n = 36 000,
    d = 8, 102 columns it took 15.4 s against 3.8 s here (an 11-column matvec: 1.05 s).
    """
    n, d = X.shape
    U, V = U.reshape(n, -1), V.reshape(n, -1)
    t = min(tile, n)
    ls = hypers.lengthscale
    Xs = X / ls
    Xsp = _pad_rows(Xs, t)
    Up = _pad_rows(U, t)
    nb = Xsp.shape[0] // t
    prof, dprof = get_profile(kernel), PROFILE_DERIVATIVES[kernel]

    B = sq_diff_basis(Xs)  # once, outside the tile loop

    def body(acc, s):
        s2bar, quad = acc
        Xt = lax.dynamic_slice_in_dim(Xsp, s, t)
        Ut = lax.dynamic_slice_in_dim(Up, s, t)
        R2 = sq_dist(Xt, Xs, s)
        W = Ut @ V.T  # padded rows of U are zero, so padded rows of W add nothing
        s2bar = s2bar + jnp.sum(W * prof(R2))
        quad = quad + sq_diff_sums((W * dprof(R2)) @ B, Xt)
        return (s2bar, quad), None

    zero = (jnp.zeros((), X.dtype), jnp.zeros((d,), X.dtype))
    (s2bar, quad), _ = lax.scan(body, zero, jnp.arange(nb) * t)
    return Hypers(-2.0 * hypers.outputscale * quad / ls, s2bar, jnp.sum(U * V))
