"""KeOps kernel matvecs callable from JAX (``jit``, ``scan``, ``fori_loop``, ``vmap``, ``vjp``).

Data flow: kernels -> matvec (**keops_bridge**: its KeOps backend) -> lanczos -> mll.

:func:`keops_matvec` returns ``K(theta) @ V`` with ``K = s2 * k(r2(X/l, X/l)) + sigma2 * I``
(see :mod:`gpadjoint.kernels`) without ever forming the ``n x n`` matrix: the pairwise sum runs
in a compiled pykeops (numpy binding) reduction, reached from JAX through ``jax.pure_callback``.
Its ``custom_vjp`` gives the exact gradient with respect to ``V`` (one more matvec, since K is
symmetric) and to the hyperparameters (one fused reduction), so the Lanczos adjoint can use it.
:func:`keops_cross_matvec` is the noise-free ``s2 * k(Xa/l, Xb/l) @ V`` for prediction.

Compilation policy (each distinct formula costs ~10 s of g++ once, then lives in
``KEOPS_CACHE_FOLDER``):

* Formulas depend only on (kernel, dtype, d, column bucket) -- never on n, the lengthscales,
  the output scale or the noise: ``X / l`` is formed in JAX, and ``s2`` and ``sigma2`` are
  applied in JAX around the reduction.
* A matvec with m right-hand-side columns runs unpadded for m <= 16 (the widths training uses
  every step); wider blocks are padded with zero columns up to ``32, 64, ..., 256`` and then the
  next multiple of 256 (:func:`column_bucket`), and the result is sliced back.
* The forward matvec, the V-cotangent and the cross matvec share one formula per width;
  the hyperparameter cotangent uses one more per :func:`grad_bucket` (steps of 16), after
  its pair weight is compressed to its numerical rank (:func:`compress_weight`).
* Under ``vmap`` over V only (e.g. several probe vectors), the batch is folded into columns
  so that it costs one reduction, not one per batch element.

Accumulation: pykeops accumulates in the input dtype (float32 for float32 data) but, by default,
with ``sum_scheme="block_sum"`` (partial sums over blocks of ~sqrt(n) terms), which we pin
explicitly: against float64 dense autodiff on the same float32 inputs it is as close as a
float32 dense computation (tests/test_keops_bridge.py), and ``kahan_scheme`` or
``dtype_acc="float64"`` were no more accurate but slower. See ``_ACC_OPTIONS``. The (d + 1)
gradient sums over i are finished on the host in float64.

Not differentiable with respect to X (it is data: its cotangent is zero), and
:func:`keops_cross_matvec` has no gradient at all.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math

import jax
import jax.numpy as jnp
import numpy as np

from gpadjoint.kernels import Hypers, get_profile

# Incremented inside the host callbacks: tests use it to prove that KeOps really ran.
# ``grad_columns``: the weight's width after :func:`compress_weight`, summed over grad calls.
CALL_COUNTS = {"kv": 0, "grad": 0, "grad_columns": 0}

# Relative singular-value cut-off of the parameter VJP's pair weight (:func:`compress_weight`),
# per dtype: 8 ulps, below what the float32 / float64 reduction itself resolves. 0 disables.
VJP_RANK_RTOL = {"float32": 8 * 2.0**-24, "float64": 8 * 2.0**-53}

# Inputs are pre-scaled by c (z = c * x / l) so that the formulas need no float constants:
# rbf exp(-|z|^2), matern12/32/52 in rho = |z| = c * r.
_SCALE = {
    "rbf": math.sqrt(0.5),
    "matern12": 1.0,
    "matern32": math.sqrt(3.0),
    "matern52": math.sqrt(5.0),
}

# k = factor * formula(x, y) on the scaled pair, with rho = Norm2(x-y). Formulas hold integer
# constants only: KeOps emits rational constants (IntInv, x / IntCst) as float32 literals, which
# would cap float64 accuracy at ~1e-8, so matern52's 1/3 is applied in JAX instead.
_RHO = "Norm2(x-y)"
KEOPS_FORMULAS = {
    "rbf": ("Exp(-SqDist(x,y))", 1.0),
    "matern12": (f"Exp(-{_RHO})", 1.0),
    "matern32": (f"(IntCst(1)+{_RHO})*Exp(-{_RHO})", 1.0),
    "matern52": (f"(IntCst(3)*(IntCst(1)+{_RHO})+SqDist(x,y))*Exp(-{_RHO})", 1.0 / 3.0),
}

# Gradient reduction, per pair: Concat(G_d (d,), k / factor (1,)) with the lengthscale term
# k'(r2) * (xs_d - xs'_d)^2 = gfactor * G_d(z, z') (xs = x / l). Written as one common scalar
# times a Concat because KeOps does not eliminate common subexpressions: the weight (u|v) (m
# multiply-adds) and the exponential are then evaluated once per pair, not once per part.
# G is finite everywhere: for matern12, k' = -exp(-r)/(2r) blows up at r = 0, but
# (z_d - z'_d)^2 <= |z - z'|^2 and KeOps' Rsqrt is 0 at 0 (tested with duplicated points), so
# G = exp(-r) * Rsqrt(r2) * (z_d - z'_d)^2 is bounded by r and exactly 0 when z = z'.
KEOPS_GRADIENTS = {  # kernel: (common scalar, Concat parts, gfactor)
    "rbf": ("Exp(-SqDist(x,y))", "Square(x-y),IntCst(1)", -1.0),
    "matern12": (f"Exp(-{_RHO})", "Rsqrt(SqDist(x,y))*Square(x-y),IntCst(1)", -0.5),
    "matern32": (f"Exp(-{_RHO})", f"Square(x-y),IntCst(1)+{_RHO}", -0.5),
    "matern52": (
        f"(IntCst(1)+{_RHO})*Exp(-{_RHO})",
        f"Square(x-y),IntCst(3)+SqDist(x,y)/(IntCst(1)+{_RHO})",
        -1.0 / 6.0,
    ),
}

# Reduction accuracy options per dtype (part of a compiled formula's identity: changing them
# recompiles). Block summation is KeOps' default for Sum; pinned so it cannot drift.
_ACC_OPTIONS = {"float32": {"sum_scheme": "block_sum"}, "float64": {"sum_scheme": "block_sum"}}


def column_bucket(m: int) -> int:
    """Return the padded width of a matvec with m columns (m to 16, then 32, 64, .. 256, x256).

    Padding is not free on a CPU: at n = 14 940, d = 18, a matvec with 16 columns took 1.32x
    as long as with 11 (the paper's 10 probes + the CG direction), so the widths that training
    uses every step run unpadded, while wide blocks (prediction, many probes) share formulas.
    """
    if m <= 16:
        return max(m, 1)
    if m <= 256:
        return 1 << (m - 1).bit_length()
    return 256 * (-(-m // 256))


def grad_bucket(m: int) -> int:
    """Return the padded width of the parameter VJP's weight (to 16: powers of two; then x16).

    Above 256 the steps are 256 wide. Its (compressed) width changes along a trajectory
    (:func:`compress_weight`), so it is bucketed: a new width costs a compile (~10 s, once).
    Steps of 16 rather than powers of two because this reduction is the most expensive pass of
    an epoch and its cost follows the width: a power of two would pad a compressed rank just
    above 32 (elevators': ~44) to 64, paying for columns that carry nothing.
    """
    if m <= 16:
        return 1 << max(0, (m - 1).bit_length())
    if m <= 256:
        return 16 * (-(-m // 16))
    return 256 * (-(-m // 256))


@functools.cache
def _pykeops_numpy():
    """Import ``pykeops.numpy`` lazily, dropping its harmless "CUDA libraries not found" line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            import pykeops.numpy as pknp
    finally:
        for line in buf.getvalue().splitlines():
            if "CUDA libraries not found" not in line:
                print(line)
    return pknp


@functools.cache
def keops_available() -> tuple[bool, str]:
    """Whether pykeops imports and compiles a trivial formula; ``(False, reason)`` if not.

    The first call may compile one tiny formula (~10 s, then cached on disk); the answer is
    memoised for the process.
    """
    try:
        pknp = _pykeops_numpy()
    except Exception as err:  # pragma: no cover - depends on the installation
        return False, f"pykeops does not import: {err!r}"
    try:
        red = pknp.Genred("SqDist(x,y)", ["x = Vi(1)", "y = Vj(1)"], reduction_op="Sum", axis=1)
        out = red(np.array([[1.0], [2.0]]), np.array([[0.0], [3.0]]))
        if not np.allclose(np.ravel(out), [5.0, 5.0]):
            return False, f"pykeops test formula returned {np.ravel(out)!r}, expected [5, 5]"
    except Exception as err:  # pragma: no cover - depends on the installation
        return False, f"pykeops cannot compile or run a formula: {err!r}"
    return True, ""


# The pair weight u_i . v_j is summed in independent pieces of this many columns.
DOT_CHUNK = 8


def _dot(m: int) -> str:
    """KeOps formula of the m-wide dot product u . v, as a sum of ``DOT_CHUNK``-wide dots.

    KeOps' CPU code evaluates ``(u|v)`` as one chain of m dependent multiply-adds per pair, and
    that chain, not the kernel, is what the parameter VJP pays for: at n = 12 000, d = 8,
    float32, m = 80, the reduction took 14.9 s against 0.96 s without the weight (and 0.97 s
    for an 11-column matvec). Split into independent 8-wide dots it took 9.4 s (20-wide: 12.4 s,
    5-wide: 9.7 s); the sum is the same up to rounding order.
    """
    if m <= DOT_CHUNK:
        return "(u|v)"
    return "+".join(
        f"(Extract(u,{c},{min(DOT_CHUNK, m - c)})|Extract(v,{c},{min(DOT_CHUNK, m - c)}))"
        for c in range(0, m, DOT_CHUNK)
    )


def keops_device(platform: str | None = None, keops_gpu: bool | None = None) -> str:
    """Return the KeOps ``backend`` ("CPU" or "GPU") for arrays on JAX's ``platform``.

    KeOps runs where the arrays live: "GPU" when JAX computes on a GPU (``platform`` defaults
    to ``jax.default_backend()``), "CPU" otherwise. ``keops_gpu`` (default: pykeops' own
    ``config.gpu_available``) says whether this pykeops can run on a GPU; on a GPU platform
    without it this raises instead of running on the CPU behind the user's back.
    """
    platform = jax.default_backend() if platform is None else platform
    if platform not in ("gpu", "cuda", "rocm"):
        return "CPU"
    if keops_gpu is None:
        _pykeops_numpy()
        import pykeops.config

        keops_gpu = bool(pykeops.config.gpu_available)
    if not keops_gpu:
        raise RuntimeError(
            f"JAX computes on {platform!r} but this pykeops has no GPU support (CUDA not found "
            "when pykeops was imported); install pykeops with CUDA, or use backend 'blocked'"
        )
    return "GPU"


@functools.cache
def genred(kind: str, kernel: str, d: int, m: int, dtype: str):
    """Build the Genred for ``kind`` 'kv' (out (n, m)) or 'grad' (out (n, d + 1))."""
    pknp = _pykeops_numpy()
    if kind == "kv":
        formula = f"({KEOPS_FORMULAS[kernel][0]})*v"
        aliases = [f"x = Vi(0,{d})", f"y = Vj(1,{d})", f"v = Vj(2,{m})"]
    else:
        common, parts, _ = KEOPS_GRADIENTS[kernel]
        # One pass: per i, sum_j w_ij [G(z_i, z_j) (d,), k(z_i, z_j) / factor (1,)].
        formula = f"(({_dot(m)})*{common})*Concat({parts})"
        aliases = [f"x = Vi(0,{d})", f"y = Vj(1,{d})", f"u = Vi(2,{m})", f"v = Vj(3,{m})"]
    return pknp.Genred(formula, aliases, reduction_op="Sum", axis=1, **_ACC_OPTIONS[dtype])


def pad_cols(a: np.ndarray, mb: int) -> np.ndarray:
    """Return ``a`` (n, m) zero-padded to ``mb`` columns, C-contiguous (a KeOps bucket)."""
    m = a.shape[1]
    if m == mb:
        return np.ascontiguousarray(a)
    return np.concatenate([a, np.zeros((a.shape[0], mb - m), a.dtype)], axis=1)


def _host_kv(kernel: str, device: str, za: np.ndarray, zb: np.ndarray, v: np.ndarray):
    """sum_j k(za_i, zb_j) v_j by KeOps on ``device``: za (na, d), zb (nb, d), v (nb, m)."""
    CALL_COUNTS["kv"] += 1
    m = v.shape[1]
    mb = column_bucket(m)
    red = genred("kv", kernel, za.shape[1], mb, za.dtype.name)
    out = red(np.ascontiguousarray(za), np.ascontiguousarray(zb), pad_cols(v, mb), backend=device)
    return out[:, :m]


def compress_weight(u: np.ndarray, v: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Fewer columns a, b with a b^T = u v^T up to singular values <= rtol * the largest.

    The parameter VJP weights each pair (i, j) by u_i . v_j, an m-wide dot product (m = probes x
    depth + 1 = 101 at the paper's settings), so its cost grows with m. The n x n weight
    u v^T has rank <= m but is numerically of much lower rank along the Lanczos adjoint
    (measured 20-60 of 100 above 1e-7 on elevators), so it is rebuilt from its thin SVD,
    QR(u) R_u R_v^T QR(v)^T, in float64, dropping what lies below ``rtol`` relative -- the
    rounding level of the reduction when ``rtol`` is a few ulps; since a reduction costs its
    whole column bucket, the leading ``grad_bucket(r)`` singular values are kept. Returns u, v
    unchanged when that would not reach a smaller bucket.
    """
    m = u.shape[1]
    if rtol <= 0 or m <= 2:
        return u, v
    qu, ru = np.linalg.qr(u.astype(np.float64))
    qv, rv = np.linalg.qr(v.astype(np.float64))
    A, sv, Bt = np.linalg.svd(ru @ rv.T)
    r = int(np.sum(sv > rtol * sv[0])) if sv[0] > 0 else 0
    if r == 0:  # the weight is zero: one zero column keeps the shapes valid
        return np.zeros((u.shape[0], 1), u.dtype), np.zeros((v.shape[0], 1), v.dtype)
    # the reduction pays for the whole column bucket, so keep every singular value it holds
    r = min(grad_bucket(r), m)
    if grad_bucket(r) >= grad_bucket(m):
        return u, v
    a = qu @ (A[:, :r] * sv[:r])
    b = qv @ Bt[:r].T
    return a.astype(u.dtype), b.astype(v.dtype)


def _host_grad(kernel: str, device: str, z: np.ndarray, u: np.ndarray, v: np.ndarray):
    """(d + 1,) sums over i, j of w_ij [G(z_i, z_j), k(z_i, z_j)] with w_ij = u_i . v_j."""
    CALL_COUNTS["grad"] += 1
    u, v = compress_weight(u, v, VJP_RANK_RTOL[z.dtype.name])
    CALL_COUNTS["grad_columns"] += u.shape[1]
    mb = grad_bucket(u.shape[1])
    z = np.ascontiguousarray(z)
    red = genred("grad", kernel, z.shape[1], mb, z.dtype.name)
    per_i = red(z, z, pad_cols(u, mb), pad_cols(v, mb), backend=device)
    # The sum over i in float64: n terms of mixed sign.
    return per_i.sum(axis=0, dtype=np.float64).astype(z.dtype)


def _looped(fn, args, core_ndims, out_core_shape, dtype):
    """Apply ``fn`` to the core dims of ``args``, looping over broadcast leading (vmap) dims."""
    pairs = list(zip(args, core_ndims, strict=True))
    batch = np.broadcast_shapes(*(a.shape[: a.ndim - k] for a, k in pairs))
    if not batch:
        return fn(*args)
    full = [np.broadcast_to(a, batch + a.shape[a.ndim - k :]) for a, k in pairs]
    out = np.empty(batch + out_core_shape, dtype)
    for idx in np.ndindex(batch):
        out[idx] = fn(*(a[idx] for a in full))
    return out


def _kv_callback(kernel, device, za, zb, v):
    za, zb, v = np.asarray(za), np.asarray(zb), np.asarray(v)
    (na, _), (nb, m) = za.shape[-2:], v.shape[-2:]
    batch = np.broadcast_shapes(za.shape[:-2], zb.shape[:-2], v.shape[:-2])
    if batch and math.prod(za.shape[:-2]) == 1 and math.prod(zb.shape[:-2]) == 1:
        # vmap over V only: fold the batch into columns -> one reduction for all of it.
        nbat = math.prod(batch)
        vb = np.broadcast_to(v, batch + (nb, m)).reshape(nbat, nb, m)
        cols = vb.transpose(1, 0, 2).reshape(nb, nbat * m)
        out = _host_kv(kernel, device, za.reshape(na, -1), zb.reshape(nb, -1), cols)
        return out.reshape(na, nbat, m).transpose(1, 0, 2).reshape(batch + (na, m))
    return _looped(lambda *a: _host_kv(kernel, device, *a), (za, zb, v), (2, 2, 2), (na, m),
                   za.dtype)


def _grad_callback(kernel, device, z, u, v):
    z, u, v = np.asarray(z), np.asarray(u), np.asarray(v)
    out_shape = (z.shape[-1] + 1,)
    return _looped(lambda *a: _host_grad(kernel, device, *a), (z, u, v), (2, 2, 2), out_shape,
                   z.dtype)


def _kv(kernel, za, zb, v):
    out = jax.ShapeDtypeStruct((za.shape[0], v.shape[1]), za.dtype)
    return jax.pure_callback(
        functools.partial(_kv_callback, kernel, keops_device()), out, za, zb, v,
        vmap_method="expand_dims",
    )


def _grad_sums(kernel, z, u, v):
    out = jax.ShapeDtypeStruct((z.shape[1] + 1,), z.dtype)
    return jax.pure_callback(
        functools.partial(_grad_callback, kernel, keops_device()), out, z, u, v,
        vmap_method="expand_dims",
    )


def scaled_inputs(kernel, X, lengthscale):
    """Return X divided by the lengthscales and scaled as the kernel's KeOps formula expects."""
    return X * (_SCALE[kernel] / lengthscale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matvec(kernel, X, V, hypers):
    Z = scaled_inputs(kernel, X, hypers.lengthscale)
    s2k = hypers.outputscale * KEOPS_FORMULAS[kernel][1]
    return s2k * _kv(kernel, Z, Z, V) + hypers.noise * V


def _matvec_fwd(kernel, X, V, hypers):
    return _matvec(kernel, X, V, hypers), (X, V, hypers)


def _matvec_bwd(kernel, res, U):
    X, V, h = res
    Z = scaled_inputs(kernel, X, h.lengthscale)
    # Separate callbacks on purpose: under jit an unused V-bar is dead code and is dropped.
    V_bar = (h.outputscale * KEOPS_FORMULAS[kernel][1]) * _kv(kernel, Z, Z, U) + h.noise * U
    sums = _grad_sums(kernel, Z, U, V)
    # d/dl_d of r2 = -2 xs_d^2 / l_d, so l_bar_d = -2 s2 / l_d * sum_ij w_ij k'(r2) dxs_d^2.
    ls_bar = (-2.0 * KEOPS_GRADIENTS[kernel][2]) * h.outputscale * sums[:-1] / h.lengthscale
    h_bar = Hypers(ls_bar, KEOPS_FORMULAS[kernel][1] * sums[-1], jnp.sum(U * V))
    return jnp.zeros_like(X), V_bar, h_bar


_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def prepare_inputs(X, hypers, kernel):
    """Check X (n, d) and cast X and the hyperparameters as the KeOps reductions take them."""
    get_profile(kernel)  # clear error for unknown names
    X = jnp.asarray(X)
    if X.dtype not in (jnp.float32, jnp.float64) or X.ndim != 2:
        raise ValueError(f"X must be a 2-D float32/float64 array, got {X.dtype} {X.shape}")
    dt, d = X.dtype, X.shape[1]
    h = Hypers(
        jnp.broadcast_to(jnp.asarray(hypers.lengthscale, dt), (d,)),
        jnp.asarray(hypers.outputscale, dt).reshape(()),
        jnp.asarray(hypers.noise, dt).reshape(()),
    )
    return X, h


def _as_columns(V, n, dt):
    V = jnp.asarray(V).astype(dt)  # cast to X's dtype (a differentiable cast under jax.vjp)
    if V.ndim not in (1, 2) or V.shape[0] != n:
        raise ValueError(f"V must have shape ({n},) or ({n}, m), got {V.shape}")
    return V.reshape(n, -1)


def keops_matvec(X, V, hypers: Hypers, kernel: str) -> jax.Array:
    """``K(hypers) @ V`` with ``K = s2 * k(|x/l - x'/l|^2) + sigma2 * I``, computed by KeOps.

    X: (n, d) inputs (float32 or float64; sets the compute dtype, V and hypers are cast to it).
    V: (n,) or (n, m). hypers: :class:`~gpadjoint.kernels.Hypers` (lengthscale (d,) in the
    units of X, outputscale and noise variances in squared target units). Returns V's shape.
    Differentiable in V and hypers (custom VJP with KeOps reductions); X gets a zero cotangent.
    """
    X, h = prepare_inputs(X, hypers, kernel)
    V = jnp.asarray(V)
    out = _matvec(kernel, X, _as_columns(V, X.shape[0], X.dtype), h)
    return out.reshape(V.shape)


def keops_cross_matvec(Xa, Xb, V, hypers: Hypers, kernel: str) -> jax.Array:
    """Noise-free ``s2 * k(Xa/l, Xb/l) @ V`` for prediction (not differentiable).

    Xa: (na, d), Xb: (nb, d), V: (nb,) or (nb, m) -> (na,) or (na, m), in Xa's dtype.
    """
    Xa, h = prepare_inputs(Xa, hypers, kernel)
    Xb = jnp.asarray(Xb).astype(Xa.dtype)
    V = jnp.asarray(V)
    Vc = _as_columns(V, Xb.shape[0], Xa.dtype)
    za, zb = scaled_inputs(kernel, Xa, h.lengthscale), scaled_inputs(kernel, Xb, h.lengthscale)
    out = (h.outputscale * KEOPS_FORMULAS[kernel][1]) * _kv(kernel, za, zb, Vc)
    return out.reshape((Xa.shape[0],) + V.shape[1:])
