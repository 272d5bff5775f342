"""Adam trajectories with each gradient estimator on a subset, scored by the exact loss.

At kin40k's full size gpadjoint's 75-epoch fit trails GPyTorch's (README), although on a
subset its gradient is closer to the exact one (scripts/gradient_bias.py). Which pace would an
*exact* gradient give? That cannot be run at n = 36 000 here, but it can on the first ``--n``
training points of a split: this script runs the same Adam (lr 0.05, 75 epochs, the shared
initial values of bench_uci) from the same start with

* ``exact``: the float64 Cholesky gradient (gpadjoint's ``estimator = "exact"``);
* ``gpadjoint``, ``gpadjoint-matched``, ... : gpadjoint's training loop (``gpadjoint.train.fit``)
  with ``configs/paper.toml`` and bench_uci's overrides for that method, dense backend, float32;
* ``gpytorch``: GPyTorch with the paper's settings (bench_uci's, every one pinned), float32;

each stochastic one for several probe seeds, and scores the parameters after every
``--every``-th epoch by the float64 Cholesky loss (-log p(y)/n, 2 pi included). One row per
(method, seed, epoch) in ``results/subset_trajectories.csv`` (rows of the same data set, split,
n and method are replaced) and a figure per data set in ``results/figures/``.

    python scripts/subset_trajectories.py --dataset kin40k --split 0 --n 4000
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import bench_uci  # noqa: E402
import gpytorch_baseline as gb  # noqa: E402

OUT = bu.ROOT / "results" / "subset_trajectories.csv"
FIG_DIR = bu.ROOT / "results" / "figures"
FIELDS = ["dataset", "split", "n", "method", "seed", "epoch", "exact_loss", "own_loss",
          "seconds", "commit", "machine"]
GPADJOINT_METHODS = list(bench_uci.METHOD_OVERRIDES)
METHODS = ["exact", *GPADJOINT_METHODS, "gpytorch"]


def _mll_config(method: str):
    from gpadjoint.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "paper.toml"
        path.write_text(bench_uci.paper_config_text(method))
        return load_config(path).mll_config()


def gpadjoint_run(method: str, X, y, epochs: int, init_seed: int, seed: int):
    """Raw parameters after each epoch (float64 Params), each epoch's own loss and seconds."""
    import jax.numpy as jnp
    import optax

    from gpadjoint.kernels import Params
    from gpadjoint.mll import MLLConfig
    from gpadjoint.train import fit, initial_params

    if method == "exact":
        cfg = MLLConfig(estimator="exact", noise_floor=gb.NOISE_FLOOR)
        dtype = jnp.float64
    else:
        cfg = _mll_config(method)
        dtype = jnp.float32
    after = []

    def keep(rec, state):
        after.append(Params(*(np.asarray(a, np.float64) for a in state.params)))

    # drawn in float32 as bench_uci's runs are (a float64 draw gives other values), then cast
    p0 = Params(*(jnp.asarray(a, dtype) for a in
                  initial_params("normal", X.shape[1], jnp.float32, init_seed)))
    res = fit(jnp.asarray(X, dtype), jnp.asarray(y, dtype), kernel="matern32", backend="dense",
              mll_config=cfg, optimizer=optax.adam(gb.LR), epochs=epochs, params0=p0,
              seed=seed, progress=False, callback=keep, warm_start=True, converge_tol=0.0)
    return after, [h["loss"] for h in res.history], [h["seconds"] for h in res.history]


def gpytorch_run(X, y, epochs: int, init_seed: int, seed: int):
    """GPyTorch with the paper's settings: as :func:`gpadjoint_run`."""
    import contextlib

    import gpytorch
    import torch

    from gpadjoint.kernels import unconstrain

    torch.manual_seed(seed)
    Xt = torch.tensor(X, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    model, lik = gb.make_gp(Xt, yt)
    gb.set_initial_raw(model, lik, init_seed, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=gb.LR)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    lik.train()
    after, losses, secs = [], [], []
    with contextlib.ExitStack() as stack:
        gb.gpytorch_context(stack, dict(gb.GPYTORCH_SETTINGS))
        for _ in range(epochs):
            loss, s = gb.gpytorch_epoch(model, mll, opt, Xt, yt)
            losses.append(loss)  # ExactMarginalLogLikelihood is already per data point
            secs.append(s)
            after.append(unconstrain(
                model.covar_module.base_kernel.lengthscale.detach().double().reshape(-1).numpy(),
                float(model.covar_module.outputscale), float(lik.noise),
                float(model.mean_module.constant), noise_floor=gb.NOISE_FLOOR,
                dtype=np.float64))
    return after, losses, secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="kin40k")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--n", type=int, default=4000, help="first n training points of the split")
    ap.add_argument("--epochs", type=int, default=75)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                    help="probe seeds of the stochastic methods (exact runs once)")
    ap.add_argument("--methods", nargs="+", choices=METHODS,
                    default=["exact", "gpadjoint", "gpadjoint-matched", "gpytorch"])
    ap.add_argument("--every", type=int, default=5, help="score every k-th epoch (and the last)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fig-dir", type=Path, default=FIG_DIR)
    args = ap.parse_args(argv)
    if args.n < 2 or args.epochs < 1 or args.every < 1:
        ap.error("--n must be >= 2 and --epochs, --every >= 1")

    import jax
    import jax.numpy as jnp

    from gpadjoint.kernels import Params
    from gpadjoint.mll import neg_mll_exact

    s = bu.load_split(args.dataset, args.split)
    if args.n > len(s.y_train):
        ap.error(f"--n {args.n} exceeds the split's {len(s.y_train)} training points")
    X = np.asarray(s.X_train[: args.n], np.float64)
    y = np.asarray(s.y_train[: args.n], np.float64)
    X64, y64 = jnp.asarray(X), jnp.asarray(y)
    exact = jax.jit(lambda p: neg_mll_exact(p, X64, y64, kernel="matern32",
                                            noise_floor=gb.NOISE_FLOOR))
    init_seed = bu.seed_for(args.split)
    base = {"dataset": args.dataset, "split": args.split, "n": args.n,
            "commit": bu.git_commit(), "machine": bu.machine()}
    scored = sorted({e for e in range(args.every - 1, args.epochs, args.every)}
                    | {args.epochs - 1})
    rows = []
    for method in args.methods:
        for seed in ([init_seed] if method == "exact" else args.seeds):
            t0 = time.perf_counter()
            if method == "gpytorch":
                after, own, secs = gpytorch_run(X, y, args.epochs, init_seed, seed)
            else:
                after, own, secs = gpadjoint_run(method, X, y, args.epochs, init_seed, seed)
            for e in scored:
                if e >= len(after):
                    break
                p = Params(*(jnp.asarray(a, jnp.float64) for a in after[e]))
                rows.append(base | {"method": method, "seed": seed, "epoch": e + 1,
                                    "exact_loss": float(exact(p)), "own_loss": own[e],
                                    "seconds": sum(secs[: e + 1])})
            last = rows[-1]
            print(f"{method:18s} seed {seed}: {len(after)} epochs in "
                  f"{time.perf_counter() - t0:6.1f} s, exact loss after {last['epoch']}: "
                  f"{last['exact_loss']:.5f}", flush=True)
    key = (args.dataset, str(args.split), str(args.n))
    bu.replace_rows(args.out, rows, FIELDS, lambda r: (
        (r["dataset"], r["split"], r["n"]) == key and r["method"] in args.methods))
    figure(args.out, args.dataset, args.split, args.n, args.fig_dir)
    return 0


def figure(path: Path, dataset: str, split: int, n: int, fig_dir: Path = FIG_DIR) -> Path | None:
    """Exact loss against epoch, one line per method (mean over seeds, band = min..max)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if (r["dataset"], r["split"], r["n"]) ==
                (dataset, str(split), str(n))]
    curves = {}
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        ep = sorted({int(r["epoch"]) for r in rows if r["method"] == method})
        vals = [[float(r["exact_loss"]) for r in rows
                 if r["method"] == method and int(r["epoch"]) == e] for e in ep]
        curves[method] = (ep, vals)
    ref = dict(zip(*curves["exact"])) if "exact" in curves else None
    fig, axes = plt.subplots(1, 2 if ref else 1, figsize=(11 if ref else 6.4, 4.2), squeeze=False)
    for method, (ep, vals) in curves.items():
        style = {"lw": 2 if method == "exact" else 1.2, "ls": "--" if method == "exact" else "-"}
        axes[0, 0].plot(ep, [np.mean(v) for v in vals], label=method, **style)
        axes[0, 0].fill_between(ep, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
        if ref:
            e2 = [e for e in ep if e in ref]
            diff = [[x - ref[e][0] for x in v] for e, v in zip(ep, vals) if e in ref]
            axes[0, 1].plot(e2, [np.mean(v) for v in diff], label=method, **style)
            axes[0, 1].fill_between(e2, [min(v) for v in diff], [max(v) for v in diff], alpha=0.2)
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_ylabel("exact -log p(y) / n (float64 Cholesky)")
    axes[0, 0].set_title(f"{dataset} split {split}, first {n} training points: Adam lr 0.05")
    axes[0, 0].legend()
    if ref:
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].set_ylabel("minus the exact-gradient run's loss (above 0: behind it)")
        axes[0, 1].set_title("the same, relative to Adam with the exact gradient")
        axes[0, 1].axhline(0, color="grey", lw=0.8)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = fig_dir / f"subset_{dataset}_n{n}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
