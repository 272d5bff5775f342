"""The GPyTorch baseline of the benchmarks: the paper's model and every pinned setting.

``run_gpytorch(spec)`` trains GPyTorch's exact GP (constant mean, scale x Matern-3/2 ARD,
noise > 1e-4) with Adam for ``spec["epochs"]`` epochs under :data:`GPYTORCH_SETTINGS` (the
paper's baseline, ../shared/REFERENCE.md), resumable from a per-epoch checkpoint, and
predicts on the test split; :func:`gpytorch_model`, :func:`gpytorch_epoch`,
:func:`count_keops` and :func:`gpytorch_context` are the pieces the other scripts
(pass counts, gradient bias, trajectories) reuse. Used by ``scripts/bench_uci.py``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

LR = 0.05
NOISE_FLOOR = 1e-4

# GPyTorch settings of the paper's baseline (../shared/REFERENCE.md), every one pinned.
GPYTORCH_SETTINGS = {
    "max_preconditioner_size": 15,
    "cg_tolerance": 1.0,
    "num_trace_samples": 10,
    "max_lanczos_quadrature_iterations": 10,
    "max_root_decomposition_size": 10,
    "min_preconditioning_size": 10,
    "fast_computations": [True, True, True],
    "tridiagonal_jitter": 0.0,
    "max_cholesky_size": 0,
    "max_cg_iterations": 1000,
}


def gpytorch_context(stack, settings: dict):
    import gpytorch

    gs = gpytorch.settings
    for name, value in settings.items():
        ctx = getattr(gs, name)
        stack.enter_context(ctx(*value) if isinstance(value, list) else ctx(value))


def make_gp(X, y, base_cls=None):
    """Build the paper's GPyTorch model (constant mean, scale x Matern-3/2 ARD, noise > 1e-4).

    Returns (model, likelihood); ``base_cls`` is the Matern kernel class (dense by default).
    """
    import gpytorch

    base_cls = base_cls or gpytorch.kernels.MaternKernel
    d = X.shape[1]

    class GP(gpytorch.models.ExactGP):
        def __init__(self, X, y, likelihood):
            super().__init__(X, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(base_cls(nu=1.5, ard_num_dims=d))

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    lik = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=gpytorch.constraints.GreaterThan(NOISE_FLOOR)
    )
    return GP(X, y, lik), lik


def set_initial_raw(model, lik, seed: int, dtype) -> None:
    """Give a :func:`make_gp` model gpadjoint's initial raw values for ``seed`` (same start)."""
    import torch

    raw = bu.initial_raw(model.covar_module.base_kernel.raw_lengthscale.shape[-1], seed)
    with torch.no_grad():
        model.covar_module.base_kernel.raw_lengthscale.copy_(
            torch.tensor(raw["raw_lengthscale"], dtype=dtype).reshape(1, -1))
        model.covar_module.raw_outputscale.copy_(torch.tensor(raw["raw_outputscale"], dtype=dtype))
        lik.noise_covar.raw_noise.copy_(torch.tensor([raw["raw_noise"]], dtype=dtype))
        model.mean_module.raw_constant.copy_(torch.tensor(raw["mean"], dtype=dtype))


def gpytorch_epoch(model, mll, opt, X, y) -> tuple[float, float]:
    """One full-batch Adam step on -mll; returns (loss, seconds)."""
    t0 = time.perf_counter()
    opt.zero_grad()
    loss = -mll(model(X), y)
    loss.backward()
    opt.step()
    return float(loss), time.perf_counter() - t0


def gpytorch_model(spec: dict):
    """Build the paper's GPyTorch model on the spec's data, with the shared initial values.

    Returns (model, likelihood, X_train, y_train, X_test, split, settings, kernel class,
    hypers()).
    """
    import gpytorch
    import torch

    s = bu.load_split(spec["dataset"], spec["split"])
    seed = bu.seed_for(spec["split"])
    torch.manual_seed(seed)
    dt = torch.float32
    Xtr = torch.tensor(np.asarray(s.X_train), dtype=dt)
    ytr = torch.tensor(np.asarray(s.y_train), dtype=dt)
    Xte = torch.tensor(np.asarray(s.X_test), dtype=dt)
    n, d = Xtr.shape
    keops = spec["backend"] == "keops"
    settings = dict(GPYTORCH_SETTINGS)
    if keops:
        # gpytorch 1.15's KeOps kernels decide per call whether to build a KeOps LazyTensor
        # (both sizes >= max_cholesky_size). At 0 the preconditioner's diagonal (a size-1
        # call) gets one too and fails ("LazyTensor cannot be made into a Tensor"); at 2 it
        # stays a torch tensor while every n > 2 solve still takes the iterative path.
        settings["max_cholesky_size"] = 2
    base_cls = gpytorch.kernels.keops.MaternKernel if keops else gpytorch.kernels.MaternKernel

    model, lik = make_gp(Xtr, ytr, base_cls)
    set_initial_raw(model, lik, seed, dt)
    model = model.to(dt)

    def hypers() -> dict:
        return {
            "lengthscale": model.covar_module.base_kernel.lengthscale.detach()
            .reshape(-1)
            .double()
            .tolist(),
            "outputscale": float(model.covar_module.outputscale),
            "noise": float(lik.noise),
            "mean": float(model.mean_module.constant),
        }

    return model, lik, Xtr, ytr, Xte, s, settings, base_cls, hypers


class PassCounter:
    """Passes over the n x n kernel pairs: KeOps reductions whose two index ranges are both n."""

    def __init__(self, n: int):
        self.n = n
        self.products = 0  # dense products touching an n x n operand (count_gpytorch_passes)
        self.keops = 0

    def big(self, t) -> bool:
        """Whether ``t`` is an n x n operand."""
        shape = getattr(t, "shape", ())
        return len(shape) >= 2 and shape[-1] == self.n and shape[-2] == self.n


@contextlib.contextmanager
def count_keops(counter: PassCounter):
    """Count pykeops reductions over the training set (forward and backward) into ``counter``."""
    from pykeops.torch.generic import generic_red

    base = generic_red.GenredAutograd_base
    orig = base._forward

    def counted(params, *args):
        rows = [a.shape[-2] for a in args if hasattr(a, "shape") and a.dim() >= 2]
        if rows.count(counter.n) >= 2:
            counter.keops += 1
        return orig(params, *args)

    base._forward = staticmethod(counted)
    try:
        yield
    finally:
        base._forward = staticmethod(orig)


def gpytorch_fingerprint(spec: dict, settings: dict) -> dict:
    """Return what a GPyTorch checkpoint must match to be resumed."""
    return {k: spec[k] for k in ("dataset", "split", "method", "backend", "epochs")} | {
        "settings": settings, "lr": LR, "seed": bu.seed_for(spec["split"])}


def run_gpytorch(spec: dict, after_train=lambda res: None) -> dict:
    import warnings

    import gpytorch
    import torch

    model, lik, Xtr, ytr, Xte, s, settings, base_cls, hypers = gpytorch_model(spec)
    n, d = Xtr.shape
    keops = spec["backend"] == "keops"
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    losses, secs, curve, npasses = [], [], [], []
    counter = PassCounter(n)
    n_warn = 0
    ckpt = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
    prior = {"train_seconds": 0.0, "n_warn": 0}
    if ckpt is not None and ckpt.exists():  # a killed run: continue where it stopped
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] != gpytorch_fingerprint(spec, settings):
            raise RuntimeError(f"checkpoint {ckpt} is of a different run "
                               f"({state['fingerprint']}); delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        losses, secs, curve = state["losses"], state["secs"], state["curve"]
        npasses = state.get("passes", [])
        prior = {"train_seconds": state["train_seconds"], "n_warn": state["n_warn"]}
    segments = bu.begin_segment(ckpt, len(losses))
    model.train()
    lik.train()
    t_train = time.perf_counter()
    with contextlib.ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpytorch_context(stack, settings)
        from gpytorch.kernels.keops.keops_kernel import _use_keops

        used_keops = bool(_use_keops(Xtr, Xtr)) if keops else False
        if keops:  # passes per epoch, counted as scripts/count_gpytorch_passes.py does
            stack.enter_context(count_keops(counter))

        def warned():
            return prior["n_warn"] + sum(
                1 for w in caught if "CG" in str(w.message) or "conver" in str(w.message))

        while len(losses) < spec["epochs"] and (not losses or math.isfinite(losses[-1])):
            curve.append(hypers())  # the parameters this epoch's loss is evaluated at
            k0 = counter.keops
            loss, sec = gpytorch_epoch(model, mll, opt, Xtr, ytr)
            secs.append(sec)
            losses.append(loss)
            if keops:
                npasses.append(counter.keops - k0)
            bu.save_progress(spec, {"stage": "train", "loss_curve": losses,
                                  "seconds_curve": secs, "hyper_curve": curve})
            if ckpt is not None:
                state = {"fingerprint": gpytorch_fingerprint(spec, settings),
                         "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "rng": torch.get_rng_state(), "losses": losses, "secs": secs,
                         "curve": curve, "passes": npasses, "n_warn": warned(),
                         "train_seconds": prior["train_seconds"] + time.perf_counter() - t_train}
                from gpadjoint._io import atomic_write

                atomic_write(ckpt, lambda fh, st=state: torch.save(st, fh))
        n_warn = warned()
    train_seconds = prior["train_seconds"] + time.perf_counter() - t_train

    final = hypers()
    res = {
        "settings": {
            "dtype": str(Xtr.dtype).removeprefix("torch."),
            "gpytorch": settings,
            "optimizer": f"torch.optim.Adam(lr={LR})",
            "kernel": f"ScaleKernel({base_cls.__module__}.MaternKernel(nu=1.5, ard))",
            "noise_constraint": f"GreaterThan({NOISE_FLOOR})",
            "keops_used_in_training": used_keops,
            "predict": f"defaults + max_cholesky_size({settings['max_cholesky_size']})"
            + (" + fast_pred_var()" if keops else ""),
            "torch_threads": torch.get_num_threads(),
        },
        "epochs_run": len(losses),
        "loss_curve": losses,
        "seconds_curve": secs,
        "hyper_curve": curve,
        # KeOps reductions over n x n per epoch (one per mBCG iteration, plus the backward's)
        "passes_curve": npasses if keops else None,
        "cg_warnings": n_warn,
        "final_hyperparameters": final,
        "final_train_loss": losses[-1] if losses else None,
        "seconds_per_epoch": float(np.median(secs)) if secs else None,
        "train_seconds": train_seconds,
        "n_train": int(n),
        "d": int(d),
        "resumed_from_epoch": segments[-1]["from_epoch"] or None,
        "segments": segments,
    }
    after_train(res)  # the common evaluator, saved before GPyTorch's prediction runs
    if spec.get("skip_own_predict"):
        return res
    model.eval()
    lik.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(gpytorch.settings.max_cholesky_size(settings["max_cholesky_size"]))
        if keops:
            stack.enter_context(gpytorch.settings.fast_pred_var())
        pred = lik(model(Xte))
        mean = pred.mean.double().numpy()
        var = pred.variance.double().clamp_min(1e-12).numpy()
    predict_seconds = time.perf_counter() - t0
    rmse, nll = bu.predictive_scores(np.asarray(s.y_test), mean, var)
    return res | {
        "test_rmse": rmse,
        "test_nll": nll,
        "predict_seconds": predict_seconds,
        "predict_method": "lanczos (LOVE)" if keops else "gpytorch default",
    }
