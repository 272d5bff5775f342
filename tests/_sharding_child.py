"""Checks of gpadjoint.sharding run in a fresh process with simulated CPU devices.

Run as ``python tests/_sharding_child.py CHECK [ARGS]`` with ``XLA_FLAGS`` already holding
``--xla_force_host_platform_device_count=4`` (JAX reads it once, at start-up, which is why the
tests launch this file instead of importing it). Each check asserts, and prints one JSON line of
the figures it compared; a failed assertion exits non-zero with the message on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import rel_err  # noqa: E402

from gpadjoint.kernels import KERNEL_NAMES, constrain, unconstrain  # noqa: E402
from gpadjoint.matvec import make_backend  # noqa: E402
from gpadjoint.mll import MLLConfig, neg_mll  # noqa: E402
from gpadjoint.sharding import AXIS, make_mesh, shard_rows  # noqa: E402

TOL = 1e-10
# CG run to round-off: with the training tolerance (1e-2) the iterate depends on the iteration at
# which the stopping test flips, so a reordered sum can change the value by ~1e-5 even on one
# device (a closure vs an argument did); converged, only the arithmetic's order remains.
CFG = MLLConfig(num_probes=3, lanczos_depth=6, precond_rank=5, cg_tol=1e-12, cg_max_iter=400,
                exact_max_n=1, estimator="slq")


def data(n, d=3, seed=0, noise=0.2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.sin(X[:, 0]) + 0.5 * np.cos(2 * X[:, 1 % d]) + 0.1 * rng.standard_normal(n)
    params = unconstrain(np.linspace(0.8, 1.5, d), 1.2, noise, 0.1, dtype=jnp.float64)
    return jnp.asarray(X), jnp.asarray(y), params


def value_grad(backend, X, y, params, cfg=CFG):
    key = jax.random.PRNGKey(0)
    f = jax.jit(jax.value_and_grad(
        lambda p, X, y: neg_mll(p, X, y, key, backend=backend, config=cfg), has_aux=True))
    (v, aux), g = f(params, X, y)
    return v, aux, g


def check_parity(n: int, name: str, kernels: list[str], precond_logdet: bool) -> dict:
    """Sharded value and gradient of neg_mll (fused SLQ + CG) equal the single-device ones."""
    mesh = make_mesh(4)
    X, y, params = data(n)
    cfg = dataclasses.replace(CFG, precond_logdet=precond_logdet)
    out = {}
    for kernel in kernels:
        v1, a1, g1 = value_grad(make_backend(name, kernel, tile=16), X, y, params, cfg)
        Xs, ys = shard_rows(mesh, X), shard_rows(mesh, y)
        v4, a4, g4 = value_grad(make_backend(name, kernel, tile=16, mesh=mesh), Xs, ys, params,
                                cfg)
        errs = {"value": abs(float(v4) - float(v1)) / abs(float(v1))}
        for field, a, b in zip(g1._fields, g4, g1, strict=True):
            errs[field] = rel_err(a, b)
        assert max(errs.values()) <= TOL, (kernel, name, n, errs)
        # passes = f(CG iterations) is the same function on 4 devices as on one (the iteration
        # at which a converged CG meets its tolerance may differ by one with the sum's order)
        per = [int(a["passes"]) - max(int(a["cg_iterations"]), cfg.lanczos_depth) for a in (a1, a4)]
        assert per[0] == per[1], (per, a1["cg_iterations"], a4["cg_iterations"])
        # the solve's result lives split by rows over the 4 devices (n divisible by 4)
        if n % 4 == 0:
            assert a4["alpha"].sharding.spec == jax.sharding.PartitionSpec(AXIS), a4["alpha"]
            assert len(a4["alpha"].addressable_shards) == 4
            assert a4["alpha"].addressable_shards[0].data.shape == (n // 4,)
        out[kernel] = errs
    return out


def check_memory(n: int) -> dict:
    """Per-device temporary memory of the compiled value+gradient falls with the device count."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((n, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal(n), jnp.float32)
    params = unconstrain(np.ones(8), 1.0, 0.1, 0.0, dtype=jnp.float32)
    cfg = MLLConfig(num_probes=4, lanczos_depth=8, precond_rank=5, cg_max_iter=8, cg_min_iter=8,
                    exact_max_n=1, estimator="slq")
    key = jax.random.PRNGKey(0)
    temp = {}
    for D in (1, 4):
        mesh = make_mesh(D)
        be = make_backend("blocked", "rbf", mesh=mesh)
        f = jax.jit(jax.value_and_grad(lambda p, X, y, be=be: neg_mll(p, X, y, key, backend=be,
                                                               config=cfg)[0]))
        ma = f.lower(params, shard_rows(mesh, X), shard_rows(mesh, y)).compile().memory_analysis()
        temp[D] = ma.temp_size_in_bytes + ma.argument_size_in_bytes
    # the (tile, n/D) kernel tiles and the (m, k, n/D) Lanczos buffers shrink 4x
    assert temp[4] < 0.35 * temp[1], temp
    return {str(k): v for k, v in temp.items()}


def check_operator_sharding() -> dict:
    """Matvec outputs and the Lanczos basis are split by rows; the matvec equals one device's."""
    from gpadjoint.lanczos import lanczos

    mesh = make_mesh(4)
    n = 64
    X, _, params = data(n)
    h = constrain(params)
    V = jnp.asarray(np.random.default_rng(1).standard_normal((n, 3)))
    be1, be4 = make_backend("blocked", "rbf", tile=8), make_backend("blocked", "rbf", tile=8,
                                                                    mesh=mesh)

    @jax.jit
    def run(X, V, h):
        mv, args = be4.operator(X, h)
        return mv(V, *args), lanczos(mv, V, *args, depth=5).Q

    KV, Q = run(shard_rows(mesh, X), shard_rows(mesh, V), h)
    assert rel_err(KV, be1.matvec(X, V, h)) <= TOL
    assert KV.sharding.spec == jax.sharding.PartitionSpec(AXIS), KV.sharding
    # Q is (m, k, n): its last axis, the rows, is the sharded one
    spec = tuple(Q.sharding.spec) + (None,) * (3 - len(Q.sharding.spec))
    assert spec[2] == AXIS and Q.addressable_shards[0].data.shape == (3, 5, n // 4), Q.sharding
    return {"matvec": str(KV.sharding.spec), "lanczos_Q": str(Q.sharding.spec)}


def check_fit_and_predict() -> dict:
    """A fit on 4 devices ends at the single-device hyperparameters; so do mean and variance."""
    import optax

    from gpadjoint import predict as gpred
    from gpadjoint.train import fit

    mesh = make_mesh(4)
    n = 128
    X, y, params = data(n, noise=0.3)
    Xt = jnp.asarray(np.random.default_rng(5).standard_normal((20, 3)))
    res = {}
    for D, m in (("1", None), ("4", mesh)):
        be = make_backend("blocked", "matern52", tile=16, mesh=m)
        Xs, ys = (X, y) if m is None else (shard_rows(m, X), shard_rows(m, y))
        r = fit(Xs, ys, kernel="matern52", backend=be, mll_config=CFG,
                optimizer=optax.adam(0.05), epochs=6, params0=params, progress=False)
        alpha, _ = gpred.mean_weights(Xs, ys, r.params, backend=be, tol=1e-12)
        mean = gpred.predict_mean(Xt, Xs, alpha, r.params, kernel="matern52")
        var = gpred.predict_variance(Xt, Xs, r.params, backend=be, method="exact", tol=1e-12)
        love = gpred.predict_variance(Xt, Xs, r.params, backend=be, method="love", y=ys,
                                      love_rank=20)
        res[D] = (r, mean, var, love, alpha)
    errs = {f: rel_err(a, b) for f, a, b in zip(params._fields, res["4"][0].params,
                                                 res["1"][0].params, strict=True)}
    # the trajectory moved (the comparison is not of the starting point with itself)
    moved = rel_err(res["1"][0].params.raw_lengthscale, params.raw_lengthscale)
    assert moved > 1e-3, moved
    for name, i in (("mean", 1), ("variance", 2), ("love", 3)):
        errs[name] = rel_err(res["4"][i], res["1"][i])
    assert max(errs.values()) <= 1e-9, errs
    assert res["4"][4].sharding.spec == jax.sharding.PartitionSpec(AXIS)
    return errs


def check_regressor() -> dict:
    """GPRegressor(devices=4) records its mesh and predicts as GPRegressor() does."""
    from gpadjoint.model import GPRegressor

    X, y, _ = data(96, noise=0.3)
    X, y = np.asarray(X), np.asarray(y)
    kw = dict(kernel="rbf", backend="blocked", estimator="slq", epochs=3, num_probes=3,
              lanczos_depth=6, cg_tol=1e-12, predict_cg_tol=1e-12, random_state=0,
              variance="exact")
    m1 = GPRegressor(**kw).fit(X, y)
    m4 = GPRegressor(**kw, devices=4).fit(X, y)
    assert m4.mesh_.startswith("4 device(s)"), m4.mesh_
    assert m1.mesh_ == "single device"
    p1, s1 = m1.predict(X[:10], return_std=True)
    p4, s4 = m4.predict(X[:10], return_std=True)
    errs = {"mean": rel_err(p4, p1), "std": rel_err(s4, s1)}
    assert max(errs.values()) <= 1e-9, errs
    try:
        GPRegressor(**kw, devices=8).fit(X, y)
    except ValueError as err:
        assert "8 devices were requested but only 4" in str(err), err
    else:
        raise AssertionError("devices=8 on 4 devices did not raise")
    return errs


def check_keops() -> dict:
    """Each shard's KeOps reduction is routed by its mesh position; results match one device."""
    from gpadjoint.sharding import KEOPS_CALLS, keops_route

    mesh = make_mesh(4)
    n = 300
    X, _, params = data(n)
    h = constrain(params)
    rng = np.random.default_rng(0)
    V, U = jnp.asarray(rng.standard_normal((n, 5))), jnp.asarray(rng.standard_normal((n, 5)))
    out = {}
    for m in (None, mesh):
        be = make_backend("keops", "rbf", mesh=m)
        Xs = X if m is None else shard_rows(m, X)
        y, vjp = jax.vjp(jax.jit(lambda V, h, X, be=be: be.matvec(X, V, h)), V, h, Xs)
        out[m is None] = (y,) + tuple(vjp(U)[:2])
    errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(out[True]),
                                          strict=True)]
    assert max(errs) <= TOL, errs
    assert keops_route(mesh) == (("CPU", -1),) * 4
    # every mesh position ran its own reductions (forward, V-cotangent, parameter sums)
    positions = sorted({p for p, _, _ in KEOPS_CALLS})
    assert positions == [0, 1, 2, 3], KEOPS_CALLS
    return {"errs": errs, "calls": len(KEOPS_CALLS)}


def check_multihost(pid: int, port: int) -> dict:
    """One of two processes (2 CPU devices each) sharing a 4-device mesh over gloo."""
    from jax.experimental import multihost_utils

    from gpadjoint.sharding import row_sharding

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60)
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    mesh = make_mesh("all")
    n = 128
    X, y, params = data(n)
    rows = slice(pid * n // 2, (pid + 1) * n // 2)  # this process's own rows only
    Xg = jax.make_array_from_process_local_data(row_sharding(mesh), np.asarray(X)[rows])
    yg = jax.make_array_from_process_local_data(row_sharding(mesh), np.asarray(y)[rows])
    v, _, g = value_grad(make_backend("blocked", "matern32", tile=16, mesh=mesh), Xg, yg, params)
    g = [multihost_utils.process_allgather(a, tiled=True) for a in g]
    with jax.default_device(jax.local_devices()[0]):
        v1, _, g1 = value_grad(make_backend("blocked", "matern32", tile=16), X, y, params)
    errs = [abs(float(v) - float(v1)) / abs(float(v1))] + [rel_err(a, b) for a, b in zip(g, g1)]
    assert max(errs) <= TOL, errs
    return {"pid": pid, "errs": errs}


def check_cli(tmp: str) -> dict:
    """``gpadjoint fit --devices 4`` prints the mesh and records it in the run record."""
    import contextlib
    import io

    from gpadjoint.cli import main as cli_main

    out = Path(tmp) / "run.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["fit", "--dataset", "yacht", "--epochs", "2", "--dtype", "float64",
                       "--backend", "blocked", "--devices", "4", "--out", str(out),
                       "--checkpoint", str(Path(tmp) / "run.ckpt")])
    assert rc == 0
    said = [ln for ln in buf.getvalue().splitlines() if ln.startswith("mesh:")]
    assert said == ["mesh: 4 device(s) on axis rows: cpu:0, cpu:1, cpu:2, cpu:3"], said
    rec = json.loads(out.read_text())
    assert rec["mesh"]["size"] == 4 and rec["mesh"]["axis"] == AXIS, rec["mesh"]
    return rec["mesh"]


CHECKS = {
    "cli": check_cli,
    "parity": lambda n, name, kernels, pre: check_parity(int(n), name, kernels.split(","),
                                                         pre == "1"),
    "all_kernels": lambda: check_parity(128, "blocked", list(KERNEL_NAMES), False),
    "memory": lambda n: check_memory(int(n)),
    "operator": check_operator_sharding,
    "fit": check_fit_and_predict,
    "regressor": check_regressor,
    "keops": check_keops,
    "multihost": lambda pid, port: check_multihost(int(pid), int(port)),
}


def main(argv):
    """Run each ``NAME[:ARG:ARG...]`` check given (one process pays JAX's start-up once)."""
    for spec in argv:
        name, *args = spec.split(":")
        if name not in CHECKS:
            raise SystemExit(f"unknown check {name!r}; choose from {', '.join(CHECKS)}")
        print(json.dumps({spec: CHECKS[name](*args)}, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
