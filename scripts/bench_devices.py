"""Per-device memory and seconds of one value + gradient of the training loss on 1, 2, 4 devices.

The rows of the data, of every kernel block and of the Lanczos / CG vectors are sharded over a
1-D mesh (:mod:`gpadjoint.sharding`); this script measures what one device then holds and how
long one ``jax.value_and_grad`` of :func:`gpadjoint.mll.neg_mll` takes. Synthetic data (uniform
inputs in [0, 1]^d, a smooth target plus noise), float32, one fresh child process per
(n, devices) with ``XLA_FLAGS=--xla_force_host_platform_device_count=<devices>``.

Memory per device (column ``mem_kind`` says which measure):

* ``peak_bytes_in_use``: on a GPU (or any device whose ``memory_stats()`` answers), the largest
  ``peak_bytes_in_use`` over the mesh's devices after the call.
* ``compiled_memory_analysis``: on a CPU, where simulated devices share one process and report
  no memory statistics, the compiled SPMD executable's own per-device figures
  (``memory_analysis()``: arguments + outputs + temporaries - aliased), i.e. what XLA allocates
  for one device's share. ``rss_mib`` is the whole process (all simulated devices together).

Seconds: on a CPU the simulated devices share the same cores (``cores`` column), so the seconds
measure the partitioned program's overhead, not a speed-up; on a multi-GPU machine the same
script, unchanged, times real devices. The estimator settings are explicit (``--depth``,
``--probes``, ``--cg-iters``: CG runs exactly that many iterations) and written on every row.

    python scripts/bench_devices.py --n 50000 200000 --devices 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

OUT = bu.ROOT / "results" / "bench_devices.csv"
KEY = ["n", "d", "devices", "backend", "kernel", "dtype", "depth", "probes", "cg_iters",
       "precond_rank", "tile"]
FIELDS = KEY + [
    "status", "platform", "device_kind", "mem_kind", "mem_per_device_mib", "temp_mib",
    "argument_mib", "rss_mib", "seconds_per_value_grad", "seconds_kind", "compile_s", "passes",
    "loss", "grad_finite", "sharding", "cores", "child_wall_s", "commit", "machine", "versions",
]


def child(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gpadjoint.kernels import unconstrain
    from gpadjoint.matvec import make_backend
    from gpadjoint.mll import MLLConfig, neg_mll
    from gpadjoint.sharding import describe_mesh, make_mesh, shard_rows

    n, d, D = spec["n"], spec["d"], spec["devices"]
    dtype = jnp.dtype(spec["dtype"])
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(n, d))
    y = np.sin(3 * X[:, 0]) + np.cos(2 * X[:, 1 % d]) + 0.1 * rng.standard_normal(n)
    mesh = make_mesh(D)
    X, y = shard_rows(mesh, jnp.asarray(X, dtype)), shard_rows(mesh, jnp.asarray(y, dtype))
    params = unconstrain(np.full(d, 0.5), 1.0, 0.05, 0.0, dtype=dtype)
    cfg = MLLConfig(num_probes=spec["probes"], lanczos_depth=spec["depth"],
                    precond_rank=spec["precond_rank"], cg_tol=1e-30,
                    cg_min_iter=spec["cg_iters"], cg_max_iter=spec["cg_iters"], estimator="slq")
    be = make_backend(spec["backend"], spec["kernel"], tile=spec["tile"], mesh=mesh)
    key = jax.random.PRNGKey(0)
    f = jax.jit(jax.value_and_grad(
        lambda p, X, y: neg_mll(p, X, y, key, backend=be, config=cfg), has_aux=True))
    t0 = time.perf_counter()
    exe = f.lower(params, X, y).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    (value, aux), grad = exe(params, X, y)
    jax.block_until_ready(grad)
    seconds = time.perf_counter() - t0
    devs = list(mesh.devices.flat)
    stats = [dev.memory_stats() for dev in devs]
    ma = exe.memory_analysis()
    temp = getattr(ma, "temp_size_in_bytes", 0) if ma is not None else 0
    arg = getattr(ma, "argument_size_in_bytes", 0) if ma is not None else 0
    if all(s and "peak_bytes_in_use" in s for s in stats):
        mem_kind = "peak_bytes_in_use"
        mem = max(s["peak_bytes_in_use"] for s in stats)
    else:
        mem_kind = "compiled_memory_analysis"
        mem = (temp + arg + getattr(ma, "output_size_in_bytes", 0)
               - getattr(ma, "alias_size_in_bytes", 0))
    on_cpu = devs[0].platform == "cpu"
    mib = 2**20
    return {
        "platform": devs[0].platform,
        "device_kind": devs[0].device_kind,
        "mem_kind": mem_kind,
        "mem_per_device_mib": round(mem / mib, 2),
        "temp_mib": round(temp / mib, 2),
        "argument_mib": round(arg / mib, 2),
        "rss_mib": round(bu.peak_rss_mib(), 1),
        "seconds_per_value_grad": round(seconds, 2),
        "seconds_kind": (f"simulated: {D} CPU device(s) sharing {os.cpu_count()} cores"
                         if on_cpu else f"{D} real {devs[0].platform} device(s)"),
        "compile_s": round(compile_s, 2),
        "passes": int(aux["passes"]),
        "loss": float(value),
        "grad_finite": all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad)),
        "sharding": f"{describe_mesh(mesh)}; X {X.sharding.spec}, alpha {aux['alpha'].sharding}",
        "cores": os.cpu_count(),
    }


def run(spec: dict, timeout: float) -> dict:
    """Run one configuration in a child process with ``spec["devices"]`` simulated devices."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={spec['devices']}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    return bu.run_child(Path(__file__), spec, timeout, env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--n", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--backend", default="blocked", choices=["blocked", "dense", "keops"])
    ap.add_argument("--kernel", default="rbf")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--cg-iters", type=int, default=2)
    ap.add_argument("--precond-rank", type=int, default=5)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=2 * 3600)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    done = bu.done_keys(args.out, KEY)
    for n in args.n:
        for D in args.devices:
            spec = {"n": n, "d": args.d, "devices": D, "backend": args.backend,
                    "kernel": args.kernel, "dtype": args.dtype, "depth": args.depth,
                    "probes": args.probes, "cg_iters": args.cg_iters,
                    "precond_rank": args.precond_rank, "tile": args.tile}
            if tuple(str(spec[k]) for k in KEY) in done:
                print(f"skip (done): {spec}")
                continue
            row = dict(spec)
            row.update(run(spec, args.timeout))
            row.update(commit=bu.git_commit(), machine=bu.machine(),
                       versions=json.dumps(bu.versions()))
            bu.append_row(args.out, row, FIELDS)
            print(", ".join(f"{k}={row.get(k)}" for k in ["n", "devices", "status",
                                                          "mem_per_device_mib",
                                                          "seconds_per_value_grad", "passes"]),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
