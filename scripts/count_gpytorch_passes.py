"""Count GPyTorch's passes over the n² kernel pairs per training epoch (a machine-independent cost).

Runs a few epochs of exactly the model and settings of ``scripts/bench_uci.py`` and counts, per
epoch, with the same rule gpadjoint's own count uses (``passes`` in its history):

* KeOps backend: every KeOps reduction over the training set (both index ranges of size n),
  forward or backward, is one pass -- counted inside pykeops' reduction entry point;
* dense backend: every matrix product that touches an n x n operand or produces one (products
  with K, the outer products of the backward pass) is one pass, counted at the aten level with
  a ``TorchDispatchMode`` so that autograd's backward products are seen too; building K is one
  more, and differentiating through the build one more.

One row per (data set, split, backend) in ``results/gpytorch_passes.csv`` (rows already there are
kept), with provenance. ``scripts/bench_epoch.py`` reads it into ``gpytorch_passes_per_epoch``.

    python scripts/count_gpytorch_passes.py --datasets elevators --backends dense keops
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402
import bench_uci  # noqa: E402
import gpytorch_baseline as gb  # noqa: E402

OUT = bu.ROOT / "results" / "gpytorch_passes.csv"
FIELDS = [
    "dataset", "split", "backend", "epochs_counted", "passes_per_epoch", "products_per_epoch",
    "keops_reductions_per_epoch", "builds_per_epoch", "seconds_per_epoch", "n_train",
    "gpytorch", "torch", "machine", "commit", "rule",
]
_MM = {"mm", "bmm", "addmm", "matmul", "baddbmm", "addbmm", "dot", "mv"}


def _dispatch_mode(counter: gb.PassCounter):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in _MM and (any(counter.big(a) for a in args) or counter.big(out)):
                counter.products += 1
            return out

    return Mode()


def count(ds: str, split: int, backend: str, epochs: int) -> dict:
    import gpytorch
    import torch

    spec = {"dataset": ds, "split": split, "backend": backend, "epochs": epochs,
            "method": "gpytorch"}
    model, lik, Xtr, ytr, _, _, settings, _, _ = gb.gpytorch_model(spec)
    n = Xtr.shape[0]
    counter = gb.PassCounter(n)
    opt = torch.optim.Adam(model.parameters(), lr=gb.LR)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    lik.train()
    per_epoch, secs = [], []
    with contextlib.ExitStack() as stack:
        gb.gpytorch_context(stack, settings)
        if backend == "keops":
            stack.enter_context(gb.count_keops(counter))
        else:
            stack.enter_context(_dispatch_mode(counter))
        for _ in range(epochs):
            p0, k0 = counter.products, counter.keops
            secs.append(gb.gpytorch_epoch(model, mll, opt, Xtr, ytr)[1])
            per_epoch.append((counter.products - p0, counter.keops - k0))
    products = float(np.median([p for p, _ in per_epoch]))
    keops = float(np.median([k for _, k in per_epoch]))
    builds = 0 if backend == "keops" else 2  # build K, and differentiate through the build
    passes = keops if backend == "keops" else products + builds
    return {
        "dataset": ds, "split": split, "backend": backend, "epochs_counted": epochs,
        "passes_per_epoch": passes, "products_per_epoch": products,
        "keops_reductions_per_epoch": keops, "builds_per_epoch": builds,
        "seconds_per_epoch": float(np.median(secs)), "n_train": int(n),
        "gpytorch": gpytorch.__version__, "torch": torch.__version__,
        "machine": bu.machine(), "commit": bu.git_commit(),
        "rule": "keops: reductions over n x n; dense: products touching n x n + build + its VJP",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["elevators"])
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--backends", nargs="+", default=["dense", "keops"],
                    choices=bench_uci.GPYTORCH_BACKENDS)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = []
    if args.out.exists():
        with args.out.open() as f:
            rows = list(csv.DictReader(f))
    for ds in args.datasets:
        for backend in args.backends:
            row = count(ds, args.split, backend, args.epochs)
            print(f"{ds} split {args.split} {backend}: {row['passes_per_epoch']:g} passes/epoch "
                  f"({row['seconds_per_epoch']:.1f} s/epoch while counting)", flush=True)
            rows = [r for r in rows if (r["dataset"], str(r["split"]), r["backend"])
                    != (ds, str(args.split), backend)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
