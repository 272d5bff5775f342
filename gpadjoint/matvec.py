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

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from .kernels import Hypers, cross_cov, dense_cov, get_profile

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
        tile: rows per tile for ``blocked``.

    """

    name: str
    kernel: str
    tile: int = 1024

    def operator(self, X, hypers: Hypers) -> tuple[Callable, tuple]:
        """Return ``(mv, args)`` with ``mv(V, *args) == K(hypers) @ V`` for V (n,) or (n, m)."""
        if self.name == "dense":
            return _dense_mv, (dense_cov(self.kernel, X, hypers),)
        if self.name == "blocked":
            return _blocked_mv_fn(self.kernel, self.tile), (X, hypers)
        if self.name == "keops":
            from .keops_bridge import keops_matvec

            kernel = self.kernel

            def mv(V, X, hypers):
                return keops_matvec(X, V, hypers, kernel)

            return mv, (X, hypers)
        raise ValueError(f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}")

    def matvec(self, X, V, hypers: Hypers):
        """K(hypers) @ V, differentiable in V and hypers."""
        mv, args = self.operator(X, hypers)
        return mv(V, *args)


def make_backend(name: str, kernel: str, *, tile: int = 1024) -> Backend:
    """Validate names and return a :class:`Backend` (no silent substitution).

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
    return Backend(name, kernel, tile)


def _available_memory_bytes() -> int:
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
    avail = _available_memory_bytes()
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


def _blocked_mv_fn(kernel: str, tile: int) -> Callable:
    """Build ``mv(V, X, hypers)`` computing K V tile by tile with a memory-light custom VJP."""

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

    @jax.custom_vjp
    def mv(V, X, hypers):
        return forward(V, X, hypers)

    def fwd(V, X, hypers):
        return forward(V, X, hypers), (V, X, hypers)

    def bwd(res, U):
        V, X, hypers = res
        n = X.shape[0]
        t = min(tile, n)
        Vbar = forward(U, X, hypers)  # K is symmetric
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
        hbar = hbar._replace(noise=hbar.noise + jnp.sum(U * V))
        return Vbar, jnp.zeros_like(X), hbar

    mv.defvjp(fwd, bwd)
    return mv
