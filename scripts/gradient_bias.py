"""How far each method's stochastic gradient is from the exact one, at a point on a real trajectory.

Takes the hyperparameters a bench_uci run (either method's record) had at a given epoch, the
first ``--n`` training points of that split, and compares, per raw parameter (softplus
lengthscales, output scale, noise; the constant mean) -- the coordinates Adam steps in:

* ``exact``: the gradient of -log p(y)/n by float64 Cholesky (:func:`gpadjoint.mll.neg_mll_exact`);
* ``gpadjoint``: the Lanczos-adjoint gradient with ``configs/paper.toml``'s estimator settings
  (depth 10, 10 probes, rank-15 CG preconditioner, CG tolerance 1, >= 10 iterations), float32;
* ``gpadjoint-plogdet``: the same with the preconditioned log det;
* ``gpadjoint-depthK`` / ``gpadjoint-plogdet-depthK`` (``--depths K ...``): the same at Lanczos
  depth K instead of 10;
* ``gpytorch``: GPyTorch's gradient with the paper's settings (bench_uci's, every one pinned),
  float32;

each stochastic one averaged over ``--reps`` probe draws (mean and standard error). Bias, not
noise, is what Adam cannot average away. One row per (estimator, coordinate) in
``results/gradient_bias.csv`` plus a summary row per estimator (coordinate ``ALL``: |mean -
exact| / |exact| over all coordinates); existing rows of the same (data set, split, epoch, n,
record, estimator) are replaced, others kept.

``--full-exact`` instead writes the exact gradient on the *whole* training split in the output
scale, the noise and the mean (:func:`gpadjoint.evaluate.exact_scale_gradient`; protein's
n = 41 157 takes one 12.6 GiB array), next to the step the run took from that epoch: the
first ``--n`` points can disagree with the full data on the output scale's direction.

    python scripts/gradient_bias.py --dataset elevators --split 1 --epoch 36 --n 2500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import bench_uci  # noqa: E402
import gpytorch_baseline as gb  # noqa: E402

OUT = bu.ROOT / "results" / "gradient_bias.csv"
FIELDS = ["dataset", "split", "epoch", "n", "estimator", "coordinate", "exact", "mean", "se",
          "rel_bias", "reps", "record", "commit", "machine"]


def _gpadjoint_grads(X, y, h, reps, precond_logdet, depths=(), cg_tol=1.0):
    import jax
    import jax.numpy as jnp

    from gpadjoint.kernels import unconstrain
    from gpadjoint.matvec import make_backend
    from gpadjoint.mll import MLLConfig, neg_mll, neg_mll_exact

    def flat(g):
        return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in g])

    p64 = unconstrain(h["lengthscale"], h["outputscale"], h["noise"], h["mean"],
                      noise_floor=gb.NOISE_FLOOR, dtype=jnp.float64)
    exact = flat(jax.grad(neg_mll_exact)(p64, jnp.asarray(X, jnp.float64),
                                         jnp.asarray(y, jnp.float64), kernel="matern32",
                                         noise_floor=gb.NOISE_FLOOR))
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)
    X32, y32 = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
    be = make_backend("dense", "matern32")
    out = {}
    variants = [("gpadjoint", False, 10)]
    if precond_logdet:
        variants.append(("gpadjoint-plogdet", True, 10))
    # deeper Lanczos than the paper's 10: does the adjoint gradient's bias shrink with depth?
    tag = "" if cg_tol == 1.0 else f"-cgtol{cg_tol:g}"
    variants += [(f"gpadjoint-depth{k}{tag}", False, k) for k in depths]
    variants += [(f"gpadjoint-plogdet-depth{k}{tag}", True, k) for k in depths if precond_logdet]
    for name, plog, depth in variants:
        tol = cg_tol if name.startswith(("gpadjoint-depth", "gpadjoint-plogdet-depth")) else 1.0
        cfg = MLLConfig(num_probes=10, lanczos_depth=depth, precond_rank=15, cg_tol=tol,
                        cg_min_iter=10, estimator="slq", precond_logdet=plog,
                        noise_floor=gb.NOISE_FLOOR)
        f = jax.jit(jax.grad(lambda p, k, cfg=cfg: neg_mll(p, X32, y32, k, backend=be,
                                                            config=cfg)[0]))
        out[name] = np.stack([flat(f(p32, jax.random.PRNGKey(100 + i))) for i in range(reps)])
    return exact, out


def _gpytorch_grads(X, y, h, reps):
    import gpytorch
    import torch

    d = X.shape[1]
    Xt = torch.tensor(X, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)

    model, lik = gb.make_gp(Xt, yt)
    model.covar_module.base_kernel.lengthscale = torch.tensor(h["lengthscale"]).reshape(1, d)
    model.covar_module.outputscale = torch.tensor(h["outputscale"])
    lik.noise = torch.tensor([h["noise"]])
    model.mean_module.constant.data.fill_(h["mean"])
    params = [model.covar_module.base_kernel.raw_lengthscale,
              model.covar_module.raw_outputscale, lik.noise_covar.raw_noise,
              model.mean_module.raw_constant]
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    lik.train()
    G = []
    for r in range(reps):
        torch.manual_seed(100 + r)
        with contextlib.ExitStack() as stack:
            gb.gpytorch_context(stack, dict(gb.GPYTORCH_SETTINGS))
            for p in params:
                p.grad = None
            (-mll(model(Xt), yt)).backward()
        G.append(np.concatenate([p.grad.detach().double().reshape(-1).numpy() for p in params]))
    return np.stack(G)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="elevators")
    ap.add_argument("--split", type=int, default=1)
    ap.add_argument("--epoch", type=int, default=36, help="index into the run's hyper_curve")
    ap.add_argument("--record",
                    help="bench_uci record of either method (default: gpadjoint's dense 75-epoch)")
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--depths", type=int, nargs="*", default=[],
                    help="extra gpadjoint estimators with these Lanczos depths (paper: 10)")
    ap.add_argument("--no-gpytorch", action="store_true", help="skip GPyTorch's gradient")
    ap.add_argument("--cg-tol", type=float, default=1.0,
                    help="CG tolerance of the --depths estimators (paper: 1.0)")
    ap.add_argument("--full-exact", action="store_true",
                    help="only the exact gradient on the whole training split, in the output "
                         "scale, noise and mean (float64 Cholesky + tr K^-1: one n x n array)")
    args = ap.parse_args(argv)
    rec_path = Path(args.record) if args.record else (
        bench_uci.OUT_DIR / f"{args.dataset}-split{args.split}-gpadjoint-dense-75ep.json")
    rec = json.loads(rec_path.read_text())
    h = rec["hyper_curve"][args.epoch]
    s = bu.load_split(args.dataset, args.split)
    if args.full_exact:
        return _full_exact(args, rec_path, rec, h, s)
    X = np.asarray(s.X_train[: args.n], np.float64)
    y = np.asarray(s.y_train[: args.n], np.float64)
    exact, draws = _gpadjoint_grads(X, y, h, args.reps, precond_logdet=True,
                                    depths=args.depths, cg_tol=args.cg_tol)
    if not args.no_gpytorch:
        draws["gpytorch"] = _gpytorch_grads(X, y, h, args.reps)
    d = X.shape[1]
    names = [f"lengthscale[{i}]" for i in range(d)] + ["outputscale", "noise", "mean"]
    base = {"dataset": args.dataset, "split": args.split, "epoch": args.epoch, "n": args.n,
            "reps": args.reps, "record": rec_path.name, "commit": bu.git_commit(),
            "machine": bu.machine()}
    rows = []
    for est, G in draws.items():
        mean, se = G.mean(0), G.std(0, ddof=1) / np.sqrt(len(G))
        rows.append(base | {"estimator": est, "coordinate": "ALL", "exact": np.linalg.norm(exact),
                            "mean": np.linalg.norm(mean), "se": "",
                            "rel_bias": np.linalg.norm(mean - exact) / np.linalg.norm(exact)})
        for i, nm in enumerate(names):
            rb = (mean[i] - exact[i]) / abs(exact[i]) if exact[i] != 0 else ""
            rows.append(base | {"estimator": est, "coordinate": nm, "exact": exact[i],
                                "mean": mean[i], "se": se[i], "rel_bias": rb})
        print(f"{est:18s} |mean - exact| / |exact| = {rows[-len(names) - 1]['rel_bias']:.4f}")
    _write(args, rows, args.n, rec_path, set(draws))
    return 0


def _write(args, rows, n, rec_path, estimators) -> None:
    """Replace the rows of this (data set, split, epoch, n, record) and these estimators."""
    key = (args.dataset, str(args.split), str(args.epoch), str(n), rec_path.name)
    bu.replace_rows(args.out, rows, FIELDS, lambda r: (
        (r["dataset"], r["split"], r["epoch"], r["n"], r["record"]) == key
        and r["estimator"] in estimators))


def _full_exact(args, rec_path, rec, h, s) -> int:
    """Write rows ``exact-full``: the exact gradient on all n training points (no subset).

    Next to it, the step the run then took in each coordinate (``mean`` holds hyper_curve[epoch
    + 1] - hyper_curve[epoch]; Adam moves against the gradient's sign when it is steady).
    """
    from gpadjoint.evaluate import exact_scale_gradient

    X = np.asarray(s.X_train, np.float64)
    y = np.asarray(s.y_train, np.float64)
    g = exact_scale_gradient(X, y, kernel=bench_uci.KERNEL, lengthscale=h["lengthscale"],
                             outputscale=h["outputscale"], noise=h["noise"], mean=h["mean"],
                             noise_floor=gb.NOISE_FLOOR)
    curve = rec["hyper_curve"] + [rec["final_hyperparameters"]]
    nxt = curve[args.epoch + 1] if args.epoch + 1 < len(curve) else None
    base = {"dataset": args.dataset, "split": args.split, "epoch": args.epoch, "n": len(y),
            "reps": 0, "record": rec_path.name, "commit": bu.git_commit(),
            "machine": bu.machine(), "estimator": "exact-full", "se": "", "rel_bias": ""}
    rows = []
    for coord, key, hk in (("outputscale", "raw_outputscale", "outputscale"),
                           ("noise", "raw_noise", "noise"), ("mean", "mean", "mean")):
        step = nxt[hk] - h[hk] if nxt is not None else ""
        rows.append(base | {"coordinate": coord, "exact": g[key], "mean": step})
        print(f"{coord:12s} exact gradient (raw) {g[key]:+.6g}   next step {step}")
    print(f"n = {len(y)}, {g['seconds']:.0f} s")
    _write(args, rows, len(y), rec_path, {"exact-full"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
