r"""Row sharding of the kernel matvec over a 1-D mesh of devices (JAX ``shard_map``).

Data flow: kernels -> tiles -> **sharding** / matvec -> lanczos. A
:class:`~gpadjoint.matvec.Backend` built with ``mesh=`` computes ``K(theta) V`` with the rows of X,
of V and of the result split over the mesh axis :data:`AXIS` ("rows"). Device p holds rows ``[p
n/D, (p+1) n/D)`` and computes its row block of K V against all columns: for ``blocked`` the column
blocks of X and V are passed round a ring (``ppermute``) and consumed tile by tile, so no device
holds all n columns; for ``dense`` as a (n/D, n) row block of K; for ``keops`` by a KeOps reduction
on its own device. Nothing else in the pipeline changes: Lanczos, CG and the fused SLQ+CG are
ordinary ``jit`` code, and XLA's partitioner (GSPMD / Shardy) propagates the row sharding from the
operator into their (m, k, n) buffers, so that their inner products and reorthogonalisation become
per-device partial sums plus an all-reduce. The parameter VJP of the matvec is a per-device partial
sum over its rows followed by ``psum``; the pass counts are those of one device.

No scheduler of our own: the mesh is ``jax.sharding.Mesh``, the collectives are XLA's.

When n is not a multiple of D the operator pads X and V with zero rows to the next multiple
inside each call (zero columns of V contribute nothing; the padded output rows are dropped), so
results are unchanged; the slice costs a reshuffle per pass, so prefer n divisible by D.

KeOps per device (:func:`keops_route`): each shard's reduction runs on the device its arrays
live on -- on a GPU, KeOps ``device_id`` = that device's local hardware id; on a CPU device
KeOps runs on the host (``device_id`` -1).

Multi-host (one process per host, every process running the same program)::

    import jax
    jax.distributed.initialize(coordinator_address="host0:12345",
                               num_processes=H, process_id=h)   # before any other JAX call
    # jax.devices() now lists the devices of all hosts; make_mesh("all") spans them.
    # Give each process its own rows of X and y:
    X = jax.make_array_from_process_local_data(row_sharding(mesh), X_local)

Launch it as H copies of the script, one per host (e.g. ``srun -N H python fit.py`` on Slurm,
where ``initialize()`` finds the arguments itself, or by hand with ``process_id`` 0..H-1 and the
address of process 0). On CPU-only hosts set ``jax.config.update(
"jax_cpu_collectives_implementation", "gloo")`` before ``initialize``.
``tests/test_sharding.py`` runs two such processes on one machine (loopback coordinator).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .kernels import PROFILE_DERIVATIVES, Hypers, get_profile, sq_diff_basis
from .tiles import finish_hbar, hbar_tile, hbar_tile_autodiff, kv_tile, symmetric_operator

AXIS = "rows"


def make_mesh(devices: int | str | Sequence | None) -> Mesh | None:
    """Return a 1-D mesh (axis :data:`AXIS`) for ``devices``: None, an int N, "all" or a list.

    ``None`` means no mesh (the single-device path). An int takes the first N of
    ``jax.devices()`` (all processes' devices in a multi-host run).

    Raises:
        ValueError: for N < 1, N above the number of devices, or an unknown string.

    """
    if devices is None:
        return None
    available = jax.devices()
    if isinstance(devices, str):
        if devices == "all":
            chosen = available
        elif devices.isdigit():
            return make_mesh(int(devices))
        else:
            raise ValueError(f"devices must be a positive integer or 'all', got {devices!r}")
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if n < 1:
            raise ValueError(f"devices must be a positive integer or 'all', got {n}")
        if n > len(available):
            raise ValueError(
                f"{n} devices were requested but only {len(available)} "
                f"{jax.default_backend()} device(s) exist: {_names(available)}"
            )
        chosen = available[:n]
    elif isinstance(devices, Sequence) and devices and not isinstance(devices, bool):
        chosen = list(devices)
    else:
        raise ValueError(f"devices must be a positive integer, 'all' or a device list, got "
                         f"{devices!r}")
    return Mesh(np.asarray(chosen, dtype=object), (AXIS,))


def _names(devs) -> str:
    return ", ".join(f"{d.platform}:{d.id}" for d in devs)


def describe_mesh(mesh: Mesh | None) -> str:
    """One line naming the mesh, e.g. ``"4 devices on axis rows: cpu:0, cpu:1, cpu:2, cpu:3"``."""
    if mesh is None:
        return "single device"
    devs = list(mesh.devices.flat)
    return f"{len(devs)} device(s) on axis {AXIS}: {_names(devs)}"


def mesh_record(mesh: Mesh | None) -> dict | None:
    """JSON-ready description of the mesh for run records (None without a mesh)."""
    if mesh is None:
        return None
    devs = list(mesh.devices.flat)
    return {
        "axis": AXIS,
        "size": len(devs),
        "devices": [f"{d.platform}:{d.id}" for d in devs],
        "processes": int(jax.process_count()),
    }


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an (n, ...) array by rows over the mesh."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def shard_rows(mesh: Mesh, A):
    """Put A (n, ...) on the mesh, split by rows.

    JAX places only evenly divisible arrays by rows; when n is not a multiple of the mesh size
    A is replicated instead (n (d + 1) numbers per device), and the operator still splits every
    kernel pass by rows inside ``jit``.
    """
    if A.shape[0] % _size(mesh):
        return jax.device_put(A, replicated(mesh))
    return jax.device_put(A, row_sharding(mesh))


def _size(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def _pad_to(A, multiple):
    pad = (-A.shape[0]) % multiple
    if pad == 0:
        return A
    return jnp.concatenate([A, jnp.zeros((pad,) + A.shape[1:], A.dtype)], axis=0)


def _gather(A):
    return lax.all_gather(A, AXIS, axis=0, tiled=True)


def _row_offset(nloc):
    return lax.axis_index(AXIS) * nloc


def _varying(tree):
    # a scan carry that accumulates per-device values must be typed as varying over the axis
    return jax.tree.map(lambda a: lax.pcast(a, (AXIS,), to="varying"), tree)


def _sharded(mesh, fn, in_specs, out_specs):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _global(mesh: Mesh, body: Callable, V, X, hypers):
    """Run ``body(V_loc, X_loc, hypers) -> (nloc, m)`` over padded row shards; return (n, m)."""
    n = X.shape[0]
    D = _size(mesh)
    col = V.ndim == 1
    V2 = V[:, None] if col else V
    out = _sharded(mesh, body, (P(AXIS), P(AXIS), P()), P(AXIS))(
        _pad_to(V2, D), _pad_to(X, D), hypers
    )[:n]
    return out[:, 0] if col else out


# --- blocked ----------------------------------------------------------------------------------


def _ring(fn, carry, Xloc, Vloc):
    """Fold ``fn(carry, Xc, Vc, src)`` over every column shard, passing shards round a ring.

    At round r device p holds the rows of column shard src = (p + r) mod D (X and V), computes
    with it, and hands it to device p - 1: each device holds one column shard at a time, so its
    memory stays O(n/D * tile), and no device ever gathers all n columns.
    """
    D = lax.axis_size(AXIS)
    p = lax.axis_index(AXIS)
    perm = [(i, (i - 1) % D) for i in range(D)]

    def body(r, state):
        carry, Xc, Vc = state
        carry = fn(carry, Xc, Vc, (p + r) % D)
        return carry, lax.ppermute(Xc, AXIS, perm), lax.ppermute(Vc, AXIS, perm)

    return lax.fori_loop(0, D, body, (carry, Xloc, Vloc))[0]


def _tiles(A, t):
    Ap = _pad_to(A, t)
    return Ap, Ap.shape[0] // t


def _blocked_body(kernel, tile, mixed=False):
    prof = get_profile(kernel)

    def body(Vloc, Xloc, hypers):
        nloc = Xloc.shape[0]
        t = min(tile, nloc)
        ls = hypers.lengthscale
        Xp, nb = _tiles(Xloc / ls, t)
        row0 = _row_offset(nloc)

        def with_shard(acc, Xc, Vc, src):
            Xcs = Xc / ls

            def rows(s):
                At = lax.dynamic_slice_in_dim(Xp, s, t)
                return kv_tile(prof, At, Xcs, Vc, hypers.outputscale, row0 + s - src * nloc,
                               mixed)

            return acc + lax.map(rows, jnp.arange(nb) * t)

        zero = jnp.zeros((nb, t) + Vloc.shape[1:], Vloc.dtype)
        blocks = _ring(with_shard, _varying(zero), Xloc, Vloc)
        out = blocks.reshape((nb * t,) + Vloc.shape[1:])[:nloc]
        return out + hypers.noise * Vloc

    return body


def _blocked_hbar_body(kernel, tile, mixed=False):
    """Per-device partial cotangent of hypers for <U, K V>, then psum over the mesh."""

    def body(Uloc, Vloc, Xloc, hypers):
        nloc, d = Xloc.shape
        row0 = _row_offset(nloc)
        t = min(tile, nloc)
        Up, nb = _tiles(Uloc, t)
        starts = jnp.arange(nb) * t
        if kernel in PROFILE_DERIVATIVES:
            ls = hypers.lengthscale
            Xsl, _ = _tiles(Xloc / ls, t)
            prof, dprof = get_profile(kernel), PROFILE_DERIVATIVES[kernel]

            def with_shard(acc, Xc, Vc, src):
                Xs = Xc / ls
                B = sq_diff_basis(Xs)

                def step(acc, s):
                    At = lax.dynamic_slice_in_dim(Xsl, s, t)
                    W = lax.dynamic_slice_in_dim(Up, s, t) @ Vc.T
                    part = hbar_tile(prof, dprof, At, Xs, B, W, row0 + s - src * nloc, mixed)
                    return jax.tree.map(jnp.add, acc, part), None

                return lax.scan(step, acc, starts)[0]

            zero = _varying((jnp.zeros((), Xloc.dtype), jnp.zeros((d,), Xloc.dtype)))
            s2bar, quad = _ring(with_shard, zero, Xloc, Vloc)
            part = finish_hbar(hypers, s2bar, quad, jnp.zeros_like(s2bar))
        else:  # matern12: autodiff through each tile
            Xp, _ = _tiles(Xloc, t)
            # differentiate w.r.t. a per-device copy of hypers: w.r.t. the replicated hypers
            # shard_map's transpose would already sum the cotangent over devices
            hv = _varying(hypers)

            def with_shard(acc, Xc, Vc, src):
                def step(acc, s):
                    At = lax.dynamic_slice_in_dim(Xp, s, t)
                    W = lax.dynamic_slice_in_dim(Up, s, t) @ Vc.T
                    g = hbar_tile_autodiff(kernel, At, Xc, W, hv, row0 + s - src * nloc)
                    return jax.tree.map(jnp.add, acc, g), None

                return lax.scan(step, acc, starts)[0]

            part = _ring(with_shard, _varying(jax.tree.map(jnp.zeros_like, hypers)), Xloc, Vloc)
        part = part._replace(noise=part.noise + jnp.sum(Uloc * Vloc))
        return jax.tree.map(lambda a: lax.psum(a, AXIS), part)

    return body


def _sharded_operator(mesh: Mesh, body, hbar_body) -> Callable:
    """Return the symmetric operator of a row-sharded ``body``; ``hbar_body``: hypers' VJP."""

    def forward(V, X, hypers):
        return _global(mesh, body, V, X, hypers)

    def hypers_vjp(X, U, V, hypers):
        D = _size(mesh)
        U2, V2 = (U[:, None], V[:, None]) if V.ndim == 1 else (U, V)
        return _sharded(mesh, hbar_body, (P(AXIS), P(AXIS), P(AXIS), P()), P())(
            _pad_to(U2, D), _pad_to(V2, D), _pad_to(X, D), hypers
        )

    return symmetric_operator(forward, hypers_vjp)


@functools.cache
def sharded_blocked_mv(mesh: Mesh, kernel: str, tile: int, mixed: bool = False) -> Callable:
    """``mv(V, X, hypers) = K V`` with rows sharded over ``mesh``; custom VJP as ``blocked``.

    The tiles are those of the single-device ``rows`` layout (:mod:`gpadjoint.tiles`), row tiles
    of the device's shard against each column shard of the ring; ``mixed`` as there.
    Cached per (mesh, kernel, tile, mixed) so that jit caches keyed on the operator stay valid.
    """
    body = _blocked_body(kernel, tile, mixed)
    hbar_body = _blocked_hbar_body(kernel, tile, mixed)

    return _sharded_operator(mesh, body, hbar_body)


# --- dense ------------------------------------------------------------------------------------


def sharded_dense_cov(mesh: Mesh, kernel: str, X, hypers: Hypers):
    """K (n, n) with its rows split over the mesh (n^2 / D entries per device).

    The build and its VJP are those of :func:`gpadjoint.kernels.dense_cov`, partitioned by XLA
    from the row-sharding constraints on X and K.
    """
    from .kernels import dense_cov

    X = lax.with_sharding_constraint(X, row_sharding(mesh))
    return lax.with_sharding_constraint(dense_cov(kernel, X, hypers), row_sharding(mesh))


def _dense_body(Vloc, Kloc):
    return Kloc @ _gather(Vloc)


@functools.cache
def sharded_dense_mv(mesh: Mesh) -> Callable:
    """``mv(V, K) = K V`` for K row-sharded: each device multiplies its rows by gathered V."""

    def mv(V, K):
        n = K.shape[0]
        D = _size(mesh)
        if n % D:  # uneven rows: let XLA partition the plain product
            return K @ V
        col = V.ndim == 1
        V2 = V[:, None] if col else V
        out = _sharded(mesh, _dense_body, (P(AXIS), P(AXIS)), P(AXIS))(V2, K)
        return out[:, 0] if col else out

    return mv


# --- keops ------------------------------------------------------------------------------------


def keops_device_id(device) -> int:
    """KeOps ``device_id`` for a JAX device: its local hardware id on a GPU, -1 on a CPU."""
    if device.platform == "gpu":
        hw = getattr(device, "local_hardware_id", None)
        return int(device.id if hw is None else hw)
    return -1


def keops_route(mesh: Mesh) -> tuple[tuple[str, int], ...]:
    """Per mesh position p: the KeOps ``(backend, device_id)`` for shard p's reduction."""
    return tuple(
        ("GPU", keops_device_id(d)) if d.platform == "gpu" else ("CPU", -1)
        for d in mesh.devices.flat
    )


# Filled by the host callbacks: (mesh position, KeOps backend, device_id) per call, for tests.
KEOPS_CALLS: list[tuple[int, str, int]] = []


def _host_kv_on(kernel, route, pos, za, zb, v):
    from .keops_bridge import column_bucket, genred, pad_cols

    p = int(np.asarray(pos).reshape(-1)[0])
    backend, dev = route[p]
    KEOPS_CALLS.append((p, backend, dev))
    za, zb, v = np.asarray(za), np.asarray(zb), np.asarray(v)
    m = v.shape[1]
    mb = column_bucket(m)
    red = genred("kv", kernel, za.shape[1], mb, za.dtype.name)
    out = red(np.ascontiguousarray(za), np.ascontiguousarray(zb), pad_cols(v, mb),
              backend=backend, device_id=dev)
    return out[:, :m]


def _host_grad_on(kernel, route, pos, zi, zj, u, v):
    from .keops_bridge import (
        VJP_RANK_RTOL,
        compress_weight,
        genred,
        grad_bucket,
        pad_cols,
    )

    p = int(np.asarray(pos).reshape(-1)[0])
    backend, dev = route[p]
    KEOPS_CALLS.append((p, backend, dev))
    zi, zj, u, v = (np.asarray(a) for a in (zi, zj, u, v))
    u, v = compress_weight(u, v, VJP_RANK_RTOL[zi.dtype.name])
    mb = grad_bucket(u.shape[1])
    red = genred("grad", kernel, zi.shape[1], mb, zi.dtype.name)
    per_i = red(np.ascontiguousarray(zi), np.ascontiguousarray(zj), pad_cols(u, mb),
                pad_cols(v, mb), backend=backend, device_id=dev)
    return per_i.sum(axis=0, dtype=np.float64).astype(zi.dtype)


def _keops_bodies(mesh, kernel):
    from .keops_bridge import KEOPS_FORMULAS, KEOPS_GRADIENTS, scaled_inputs

    route = keops_route(mesh)
    factor = KEOPS_FORMULAS[kernel][1]

    def kv(za, zb, v):
        pos = lax.axis_index(AXIS).reshape(1)
        out = jax.ShapeDtypeStruct((za.shape[0], v.shape[1]), za.dtype)
        return jax.pure_callback(
            functools.partial(_host_kv_on, kernel, route), out, pos, za, zb, v
        )

    def body(Vloc, Xloc, hypers):
        Z = scaled_inputs(kernel, Xloc, hypers.lengthscale)
        Zall, Vall = _gather(Z), _gather(Vloc)
        return hypers.outputscale * factor * kv(Z, Zall, Vall) + hypers.noise * Vloc

    def hbar_body(Uloc, Vloc, Xloc, hypers):
        Z = scaled_inputs(kernel, Xloc, hypers.lengthscale)
        Zall, Vall = _gather(Z), _gather(Vloc)
        pos = lax.axis_index(AXIS).reshape(1)
        out = jax.ShapeDtypeStruct((Z.shape[1] + 1,), Z.dtype)
        sums = jax.pure_callback(
            functools.partial(_host_grad_on, kernel, route), out, pos, Z, Zall, Uloc, Vall
        )
        sums = lax.psum(sums, AXIS)
        h = hypers
        ls_bar = (-2.0 * KEOPS_GRADIENTS[kernel][2]) * h.outputscale * sums[:-1] / h.lengthscale
        noise_bar = lax.psum(jnp.sum(Uloc * Vloc), AXIS)
        return Hypers(ls_bar, factor * sums[-1], noise_bar)

    return body, hbar_body


@functools.cache
def sharded_keops_mv(mesh: Mesh, kernel: str) -> Callable:
    """``mv(V, X, hypers) = K V`` by one KeOps reduction per shard, on the shard's device."""
    body, hbar_body = _keops_bodies(mesh, kernel)

    return _sharded_operator(mesh, body, hbar_body)


def sharded_keops_operator(mesh: Mesh, kernel: str, X, hypers: Hypers):
    """KeOps operator ``(mv, args)`` on the mesh, with X and hypers cast as the bridge does."""
    from .keops_bridge import prepare_inputs

    X, h = prepare_inputs(X, hypers, kernel)
    return sharded_keops_mv(mesh, kernel), (X, h)
