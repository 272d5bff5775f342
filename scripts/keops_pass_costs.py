"""Seconds per KeOps pass, by kind, for one value + gradient of each method at the same point.

Why gpadjoint's KeOps epoch costs more than GPyTorch's is two questions: how many passes over
the n² kernel pairs each makes (bench_epoch / count_gpytorch_passes answer that) and what each
pass costs. This script answers the second. At the hyperparameters a bench_uci KeOps run had at
``--epoch`` (both methods at the same point, the paper's settings, float32), it times every
KeOps reduction over the training set during ``--reps`` value + gradient evaluations:

* gpadjoint: :func:`gpadjoint.mll.neg_mll` with ``configs/paper.toml``'s estimator, jitted, CG
  warm-started from the previous evaluation's solution as in training. Reductions are
  ``kv`` (K times an m-column block: forward Lanczos/CG passes and adjoint passes) and ``grad``
  (the one fused parameter VJP, weighted by an m-wide dot product per pair; ``columns`` is
  the padded width it ran at after :func:`gpadjoint.keops_bridge.compress_weight`, the kind
  ``grad[m]`` names the width before);
* GPyTorch: ``-mll(model(X), y).backward()`` under bench_uci's pinned settings; each pykeops
  reduction is labelled by its output width (the number of right-hand sides for a matvec).

One row per (method, kind, columns) with the count and mean seconds per evaluation, plus a row
``kind = step`` with the wall seconds of a whole evaluation, in ``results/keops_pass_costs.csv``
(rows of the same data set, split and epoch are replaced).

    python scripts/keops_pass_costs.py --dataset elevators --split 0 --epoch 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import bench_uci  # noqa: E402
import gpytorch_baseline as gb  # noqa: E402

OUT = bu.ROOT / "results" / "keops_pass_costs.csv"
FIELDS = ["dataset", "split", "epoch", "n", "d", "method", "kind", "columns", "count",
          "seconds_mean", "seconds_per_eval", "reps", "passes_reported", "record", "load_avg",
          "commit", "machine"]


class _Log:
    def __init__(self):
        self.calls: list[tuple[str, int, float]] = []

    def add(self, kind, cols, secs):
        self.calls.append((kind, int(cols), float(secs)))


def _gpadjoint(X, y, h, reps, log: _Log) -> tuple[list[float], list]:
    import jax
    import jax.numpy as jnp

    from gpadjoint import keops_bridge as kb
    from gpadjoint.kernels import unconstrain
    from gpadjoint.matvec import make_backend
    from gpadjoint.mll import MLLConfig, neg_mll

    cfg = MLLConfig(num_probes=10, lanczos_depth=10, precond_rank=15, cg_tol=1.0,
                    cg_min_iter=10, estimator="slq", precond_logdet=False,
                    noise_floor=gb.NOISE_FLOOR)
    be = make_backend("keops", "matern32")
    X32, y32 = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
    p = unconstrain(h["lengthscale"], h["outputscale"], h["noise"], h["mean"],
                    noise_floor=gb.NOISE_FLOOR, dtype=jnp.float32)
    f = jax.jit(jax.value_and_grad(
        lambda p, k, x0: neg_mll(p, X32, y32, k, backend=be, config=cfg, x0=x0), has_aux=True))
    (_, aux), _ = f(p, jax.random.PRNGKey(0), None)  # cold CG (and its compile)
    x0 = aux["alpha"]
    (_, aux), g = f(p, jax.random.PRNGKey(1), x0)  # compiles the warm-started step
    jax.block_until_ready(g)
    x0 = aux["alpha"]

    orig_kv, orig_grad = kb._host_kv, kb._host_grad

    def kv(kernel, device, za, zb, v):
        t = time.perf_counter()
        out = orig_kv(kernel, device, za, zb, v)
        log.add("kv", v.shape[1], time.perf_counter() - t)
        return out

    def grad(kernel, device, z, u, v):
        t = time.perf_counter()
        c0 = kb.CALL_COUNTS["grad_columns"]
        out = orig_grad(kernel, device, z, u, v)
        # labelled by the width it ran at, after compress_weight (the input width in brackets)
        log.add(f"grad[{u.shape[1]}]", kb.grad_bucket(kb.CALL_COUNTS["grad_columns"] - c0),
                time.perf_counter() - t)
        return out

    walls, passes = [], []
    kb._host_kv, kb._host_grad = kv, grad
    try:
        for r in range(reps):
            t = time.perf_counter()
            (_, aux), g = f(p, jax.random.PRNGKey(2 + r), x0)
            jax.block_until_ready(g)
            walls.append(time.perf_counter() - t)
            passes.append(int(aux["passes"]))
            x0 = aux["alpha"]
    finally:
        kb._host_kv, kb._host_grad = orig_kv, orig_grad
    return walls, passes


def _gpytorch(spec, h, reps, log: _Log, m: int) -> list[float]:
    import gpytorch
    import torch
    from pykeops.torch.generic import generic_red

    # bench_uci's model and settings for its KeOps backend, moved to the point being timed
    model, lik, Xt, yt, _, _, settings, _, _ = gb.gpytorch_model(spec | {"backend": "keops"})
    Xt, yt = Xt[:m].contiguous(), yt[:m].contiguous()
    model.set_train_data(Xt, yt, strict=False)
    n, d = Xt.shape
    model.covar_module.base_kernel.lengthscale = torch.tensor(h["lengthscale"]).reshape(1, d)
    model.covar_module.outputscale = torch.tensor(h["outputscale"])
    lik.noise = torch.tensor([h["noise"]])
    model.mean_module.constant.data.fill_(h["mean"])
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    lik.train()

    base = generic_red.GenredAutograd_base
    orig = base._forward

    def timed(params, *args):
        t = time.perf_counter()
        out = orig(params, *args)
        rows = [a.shape[-2] for a in args if hasattr(a, "shape") and a.dim() >= 2]
        if rows.count(n) >= 2:
            log.add("reduction", out[0].shape[-1], time.perf_counter() - t)
        return out

    def step():
        with contextlib.ExitStack() as stack:
            gb.gpytorch_context(stack, settings)
            model.zero_grad()
            (-mll(model(Xt), yt)).backward()

    torch.manual_seed(0)
    step()  # compiles any missing KeOps formula
    walls = []
    base._forward = staticmethod(timed)
    try:
        for r in range(reps):
            torch.manual_seed(1 + r)
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    finally:
        base._forward = staticmethod(orig)
    return walls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="elevators")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--epoch", type=int, default=5, help="index into the run's hyper_curve")
    ap.add_argument("--record", help="bench_uci gpadjoint record (default: the KeOps 10-epoch)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n", type=int, default=0, help="first n training points (0: all)")
    ap.add_argument("--methods", nargs="+", default=["gpadjoint", "gpytorch"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rec_path = Path(args.record) if args.record else (
        bench_uci.OUT_DIR / f"{args.dataset}-split{args.split}-gpadjoint-keops-10ep.json")
    h = json.loads(rec_path.read_text())["hyper_curve"][args.epoch]
    s = bu.load_split(args.dataset, args.split)
    m = args.n or len(s.y_train)
    X = np.asarray(s.X_train[:m], np.float64)
    y = np.asarray(s.y_train[:m], np.float64)
    n, d = X.shape
    base = {"dataset": args.dataset, "split": args.split, "epoch": args.epoch, "n": n, "d": d,
            "reps": args.reps, "record": rec_path.name, "commit": bu.git_commit(),
            "machine": bu.machine()}
    rows = []
    for method in args.methods:
        log = _Log()
        load = bu.load_avg()[0]
        if method == "gpadjoint":
            walls, passes = _gpadjoint(X, y, h, args.reps, log)
        else:
            spec = {"dataset": args.dataset, "split": args.split, "method": "gpytorch"}
            walls, passes = _gpytorch(spec, h, args.reps, log, m), []
        load = max(load, bu.load_avg()[0])
        groups = defaultdict(list)
        for kind, cols, secs in log.calls:
            groups[(kind, cols)].append(secs)
        for (kind, cols), secs in sorted(groups.items()):
            rows.append(base | {"method": method, "kind": kind, "columns": cols,
                                "count": len(secs) / args.reps,
                                "seconds_mean": float(np.mean(secs)),
                                "seconds_per_eval": float(np.sum(secs)) / args.reps,
                                "load_avg": load})
        reductions = sum(len(v) for v in groups.values()) / args.reps
        rows.append(base | {"method": method, "kind": "step", "columns": "",
                            "count": reductions, "seconds_mean": float(np.mean(walls)),
                            "seconds_per_eval": float(np.mean(walls)),
                            "passes_reported": float(np.mean(passes)) if passes else "",
                            "load_avg": load})
        for r in rows:
            if r["method"] == method:
                print(f"{method:10s} {r['kind']:9s} cols {str(r['columns']):>4s} x "
                      f"{r['count']:5.1f}: {r['seconds_mean']:.3f} s each, "
                      f"{r['seconds_per_eval']:.2f} s per evaluation", flush=True)
    key = (args.dataset, str(args.split), str(args.epoch))
    bu.replace_rows(args.out, rows, FIELDS, lambda r: (
        (r["dataset"], r["split"], r["epoch"]) == key and r["method"] in args.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
