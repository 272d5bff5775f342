"""Training loop: full-batch optax steps on :func:`gpadjoint.mll.neg_mll`.

Stage 6 of the pipeline (mll -> **train** -> model).

Two layers, in the manner of optax:

* :func:`make_trainer` returns a :class:`Trainer`, a pure pair ``init(params, key) -> state`` and
  ``step(state) -> (state, metrics)`` over an explicit :class:`TrainState`. The step is compiled
  once: value and gradient of the loss at the current parameters, one optimiser update. Epoch ``e``
  (0-based) draws its probes from ``jax.random.fold_in(key, e)``, so value and gradient share one
  draw and a run is reproducible from its seed. Any ``optax.GradientTransformation`` works.
* :func:`fit` runs the loop around it: history, progress line, non-finite guard, CG diagnostics,
  early stopping and atomic, resumable checkpoints.

Units: X, y are already normalised (:mod:`gpadjoint.data`) and in the working dtype; the loss is
``-log p(y | theta) / n`` per datum in those units; hyperparameters in the history are
constrained (lengthscales in standardised input units, output scale and noise as variances).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._io import atomic_write
from .kernels import Params, constrain, init_params
from .matvec import Backend, choose_backend, make_backend
from .mll import MLLConfig, choose_estimator, neg_mll

CHECKPOINT_FORMAT = "gpadjoint-checkpoint-v1"
_DEFAULT_MLL = MLLConfig()


class CGConvergenceWarning(RuntimeWarning):
    """CG stopped at ``cg_max_iter`` without reaching ``cg_tol`` during training."""


class TrainState(NamedTuple):
    """Everything a step needs; a pytree (checkpointed as such).

    params: unconstrained :class:`~gpadjoint.kernels.Params` (working dtype).
    opt_state: the optimiser's state.
    epoch: int32 scalar, number of completed epochs.
    key: base PRNG key of the run; epoch e uses ``fold_in(key, e)``.
    last_alpha: (n,) ``K^{-1}(y - mu)`` of the previous epoch, CG's warm start; None when warm
        starts are off.
    """

    params: Params
    opt_state: Any
    epoch: jax.Array
    key: jax.Array
    last_alpha: jax.Array | None


class Trainer(NamedTuple):
    """Pure training functions for one data set (see :func:`make_trainer`).

    init(params, key) -> TrainState; step(state) -> (state, metrics);
    compile(state) -> seconds spent compiling (~0 when already compiled);
    trace_count() -> how often the step for these settings has been traced in this process
    (stays 1 over any number of steps).
    """

    init: Callable[..., TrainState]
    step: Callable[[TrainState], tuple[TrainState, dict]]
    compile: Callable[[TrainState], float]
    trace_count: Callable[[], int]


class EarlyStopping(NamedTuple):
    """Early-stopping rule: stop on a loss plateau.

    Stops when the loss has not fallen more than ``min_delta`` (absolute, per datum) below its
    best value for ``patience`` consecutive epochs.

    The loss is a stochastic estimate (new probes each epoch), so ``min_delta`` should exceed
    its epoch-to-epoch noise.
    """

    patience: int = 10
    min_delta: float = 1e-4


class FitResult(NamedTuple):
    """Outcome of :func:`fit`.

    params: final unconstrained parameters (the last finite ones).
    history: one dict per completed epoch (see :func:`fit`).
    stopped_reason: why the loop ended, in words.
    state: final :class:`TrainState` (resume from it with :meth:`Trainer.step`).
    info: backend and the reason it was chosen, fingerprint, compile seconds, checkpoint path.
    """

    params: Params
    history: list[dict]
    stopped_reason: str
    state: TrainState
    info: dict


# --------------------------------------------------------------------------------------------
# Trainer


def make_trainer(
    X,
    y,
    *,
    backend: Backend,
    mll_config: MLLConfig = _DEFAULT_MLL,
    optimizer: optax.GradientTransformation,
    warm_start: bool = True,
) -> Trainer:
    """Build the pure init/step pair for data ``X`` (n, d) and ``y`` (n,).

    ``warm_start``: start each epoch's CG from the previous epoch's solution (saves iterations
    once the hyperparameters settle; the stopping rule, hence the accuracy, is unchanged).

    A step whose loss, gradient or updated parameters are not all finite returns the input state
    unchanged (``metrics["ok"]`` False); the caller decides what to do.

    The step is compiled once per (backend, mll_config, optimizer, shapes and dtypes): trainers
    for the same settings share the executable, e.g. a resumed run does not compile again.
    """
    X = jnp.asarray(X)
    y = jnp.asarray(y)
    dtype = X.dtype
    static = (backend, mll_config, optimizer)

    def init(params: Params, key) -> TrainState:
        params = Params(*(jnp.asarray(p, dtype) for p in params))
        if params.raw_lengthscale.shape != (X.shape[1],):
            raise ValueError(
                f"params.raw_lengthscale has shape {params.raw_lengthscale.shape}, "
                f"expected ({X.shape[1]},) for d = {X.shape[1]} inputs"
            )
        return TrainState(
            params=params,
            opt_state=optimizer.init(params),
            epoch=jnp.asarray(0, jnp.int32),
            key=key,
            last_alpha=jnp.zeros(X.shape[0], dtype) if warm_start else None,
        )

    def executable(state: TrainState):
        sig = (static, _signature((state, X, y)))
        exe = _COMPILED.get(sig)
        if exe is None:
            exe = _train_step.lower(
                state, X, y, backend=backend, mll_config=mll_config, optimizer=optimizer
            ).compile()
            _COMPILED[sig] = exe
        return exe

    def compile(state: TrainState) -> float:
        t0 = time.perf_counter()
        executable(state)
        return time.perf_counter() - t0

    def step(state: TrainState):
        return executable(state)(state, X, y)

    return Trainer(init, step, compile, lambda: _TRACES.get(static, 0))


# Compiled steps by (static settings, input signature), and how often each setting was traced.
_COMPILED: dict = {}
_TRACES: dict = {}


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (np.shape(a), str(getattr(a, "dtype", type(a))), _weak(a)) for a in leaves
    )


def _weak(a) -> bool:
    return bool(getattr(a, "weak_type", False))


@partial(jax.jit, static_argnames=("backend", "mll_config", "optimizer"))
def _train_step(state: TrainState, X, y, *, backend, mll_config, optimizer):
    static = (backend, mll_config, optimizer)
    _TRACES[static] = _TRACES.get(static, 0) + 1  # runs only while tracing
    key = jax.random.fold_in(state.key, state.epoch)

    def loss(p):
        return neg_mll(p, X, y, key, backend=backend, config=mll_config, x0=state.last_alpha)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        # L-BFGS's line search needs the value and the loss itself (same probes and key);
        # the other optax transformations ignore these.
        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.params, value=value, grad=grads,
            value_fn=lambda p: loss(p)[0],
        )
    else:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    finite_loss = jnp.isfinite(value)
    finite_grad = jnp.isfinite(gnorm)
    finite_update = _all_finite(new_params)
    ok = finite_loss & finite_grad & finite_update

    def keep(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    alpha = None
    if state.last_alpha is not None:
        alpha = jnp.where(ok & _all_finite(aux["alpha"]), aux["alpha"], state.last_alpha)
    new_state = TrainState(
        params=keep(new_params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        epoch=state.epoch + ok.astype(state.epoch.dtype),
        key=state.key,
        last_alpha=alpha,
    )
    hypers = constrain(state.params, mll_config.noise_floor)
    metrics = {
        "loss": value,
        "grad_norm": gnorm,
        "lengthscale": hypers.lengthscale,
        "outputscale": hypers.outputscale,
        "noise": hypers.noise,
        "mean": state.params.mean,
        "cg_iterations": aux["cg_iterations"],
        "cg_residual": aux["cg_residual"],
        "passes": aux["passes"],
        "ok": ok,
        "finite_loss": finite_loss,
        "finite_grad": finite_grad,
        "finite_update": finite_update,
    }
    return new_state, metrics


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in leaves]))


def initial_params(init: str, d: int, dtype, seed: int = 0) -> Params:
    """Return starting parameters by name.

    ``softplus0``: all raw values 0, i.e. lengthscales and output scale 0.693, noise 0.693 +
    floor; ``normal``: raw values N(0, 1), as the paper.

    ``normal`` draws from a key derived from ``seed`` but distinct from the probes' key.
    """
    if init == "softplus0":
        return init_params(d, dtype)
    if init == "normal":
        key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x1D17)
        return init_params(d, dtype, key=key)
    raise ValueError(f"unknown init {init!r}; choose 'softplus0' or 'normal'")


# --------------------------------------------------------------------------------------------
# fit


def fit(
    X,
    y,
    *,
    kernel: str = "matern32",
    backend: Backend | str = "auto",
    mll_config: MLLConfig | None = None,
    optimizer: optax.GradientTransformation | None = None,
    epochs: int,
    params0: Params | None = None,
    seed: int = 0,
    early_stopping: EarlyStopping | None = None,
    checkpoint_path=None,
    checkpoint_every: int = 10,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable[[dict, TrainState], Any] | None = None,
    warm_start: bool = True,
    settings: Mapping | None = None,
    log_every: int = 1,
    converge_tol: float = 1e-5,
) -> FitResult:
    """Fit GP hyperparameters by minimising ``neg_mll`` for ``epochs`` full-batch steps.

    Args:
        X: (n, d) normalised inputs, float32 or float64 (the working dtype of the run).
        y: (n,) normalised targets, same dtype.
        kernel: kernel name; must match ``backend.kernel`` when a Backend is passed.
        backend: a :class:`~gpadjoint.matvec.Backend`, a backend name, or "auto"
            (:func:`~gpadjoint.matvec.choose_backend`; the choice and its reason are in
            ``info``).
        mll_config: estimator settings (default :class:`~gpadjoint.mll.MLLConfig`).
        optimizer: any optax transformation (default ``optax.adam(0.05)``).
        epochs: total number of epochs of the run (including those of a resumed checkpoint).
        params0: starting unconstrained parameters (default: raw values 0).
        seed: the run's PRNG seed (probes of epoch e from ``fold_in(PRNGKey(seed), e)``).
        early_stopping: :class:`EarlyStopping` or None (off).
        checkpoint_path: file to write checkpoints to (atomically), or None.
        checkpoint_every: epochs between checkpoints (0: only when the loop ends, which always
            writes one).
        resume: continue from ``checkpoint_path`` (must exist and match this run's fingerprint).
        progress: None: a progress line on stderr when stderr is a TTY; True: always (one line
            every ``log_every`` epochs when not a TTY); False: silent.
        callback: called as ``callback(record, state)`` after each epoch; returning True stops.
        warm_start: CG starts from the previous epoch's solution.
        settings: extra JSON-serialisable settings (e.g. the run's config without its epoch
            count) stored in the checkpoint fingerprint; a resume must pass equal settings.
        log_every: epochs between progress lines when not on a TTY.
        converge_tol: with the exact (deterministic) estimator and no ``early_stopping``
            given, stop once the loss has not improved by ``converge_tol`` for 5 epochs
            (converged); 0 turns this off. Ignored with SLQ, whose loss is stochastic.

    Returns:
        :class:`FitResult`. History records (one per completed epoch): ``epoch`` (1-based),
        ``loss`` (per datum), ``grad_norm`` (of the raw parameters), ``lengthscale`` (list),
        ``outputscale``, ``noise``, ``mean`` -- all evaluated at the parameters *entering* that
        epoch, so loss and hyperparameters belong together -- then ``cg_iterations``,
        ``cg_residual`` (relative), ``cg_converged``, ``passes`` (passes over the n^2 kernel
        pairs for that value and gradient; 0 for the exact estimator) and ``seconds`` (wall
        time of the step,
        compilation excluded; it is in ``info["compile_seconds"]``).

    A non-finite loss, gradient or update stops the loop before that update is applied: the
    result holds the last finite parameters and ``stopped_reason`` names the epoch and cause.
    """
    X = jnp.asarray(X)
    y = jnp.asarray(y)
    _check_data(X, y)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be an int, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    n, d = X.shape
    dtype = X.dtype
    mll_config = MLLConfig() if mll_config is None else mll_config
    optimizer = optax.adam(0.05) if optimizer is None else optimizer
    backend, backend_reason = _resolve_backend(backend, kernel, n, dtype)
    estimator, estimator_reason = choose_estimator(n, mll_config)
    if estimator == "exact" and early_stopping is None and converge_tol > 0:
        early_stopping = EarlyStopping(patience=5, min_delta=float(converge_tol))

    trainer = make_trainer(
        X, y, backend=backend, mll_config=mll_config, optimizer=optimizer, warm_start=warm_start
    )
    params0 = init_params(d, dtype) if params0 is None else params0
    state = trainer.init(params0, jax.random.PRNGKey(seed))
    fingerprint = _fingerprint(X, y, kernel, backend, mll_config, seed, state, settings)

    history: list[dict] = []
    if resume:
        state, history = load_checkpoint(checkpoint_path, state, fingerprint)

    compile_seconds = trainer.compile(state)
    info = {
        "backend": backend.name,
        "backend_reason": backend_reason,
        "estimator": estimator,
        "estimator_reason": estimator_reason,
        "kernel": kernel,
        "dtype": str(dtype),
        "n": n,
        "d": d,
        "seed": seed,
        "compile_seconds": compile_seconds,
        "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
        "resumed_from_epoch": int(state.epoch) if resume else None,
        "fingerprint": fingerprint,
    }

    bar = _Progress(epochs, progress, log_every)
    bar.note(
        f"gpadjoint fit: n={n} d={d} {dtype} kernel={kernel} backend={backend.name} "
        f"({backend_reason}); estimator {estimator} ({estimator_reason}); "
        f"step compiled in {compile_seconds:.1f} s"
    )
    best, wait = _replay_early_stopping(history, early_stopping)
    cg_warned = False
    stopped_reason = f"completed {epochs} epochs"
    start = int(state.epoch)
    if early_stopping is not None and wait >= early_stopping.patience:
        start = epochs  # the checkpointed run had already stopped early
        stopped_reason = _early_reason(len(history), early_stopping, best)
    elif start >= epochs:
        stopped_reason = f"the checkpoint is already at epoch {start} (epochs={epochs})"

    for e in range(start, epochs):
        t0 = time.perf_counter()
        new_state, m = trainer.step(state)
        m = jax.device_get(m)
        seconds = time.perf_counter() - t0
        if not m["ok"]:
            stopped_reason = _nonfinite_reason(e + 1, m)
            break
        state = new_state
        rec = _record(e + 1, m, seconds, mll_config)
        history.append(rec)
        if not rec["cg_converged"] and not cg_warned:
            cg_warned = True
            bar.break_line()
            warnings.warn(_cg_message(rec, mll_config, dtype), CGConvergenceWarning, stacklevel=2)
        bar.update(rec)
        if checkpoint_path is not None and checkpoint_every and (e + 1) % checkpoint_every == 0:
            save_checkpoint(checkpoint_path, state, history, fingerprint)
        if early_stopping is not None:
            best, wait = _early_update(best, wait, rec["loss"], early_stopping)
            if wait >= early_stopping.patience:
                stopped_reason = _early_reason(e + 1, early_stopping, best)
                break
        if callback is not None and callback(rec, state) is True:
            stopped_reason = f"callback requested a stop after epoch {e + 1}"
            break
    bar.close()
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, state, history, fingerprint, stopped_reason)
    return FitResult(state.params, history, stopped_reason, state, info)


def _check_data(X, y):
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n, d), got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X, got {y.shape}")
    if X.dtype not in (jnp.float32, jnp.float64) or y.dtype != X.dtype:
        raise ValueError(
            f"X and y must share a float32 or float64 dtype (the working dtype), "
            f"got {X.dtype} and {y.dtype}"
        )


def _resolve_backend(backend, kernel, n, dtype) -> tuple[Backend, str]:
    if isinstance(backend, Backend):
        if backend.kernel != kernel:
            raise ValueError(
                f"backend was built for kernel {backend.kernel!r} but fit got kernel={kernel!r}"
            )
        return backend, "given"
    if backend == "auto":
        name, reason = choose_backend(n, dtype)
        return make_backend(name, kernel), f"auto: {reason}"
    return make_backend(backend, kernel), "requested"


def _record(epoch: int, m: dict, seconds: float, cfg: MLLConfig) -> dict:
    res = float(m["cg_residual"])
    return {
        "epoch": epoch,
        "loss": float(m["loss"]),
        "grad_norm": float(m["grad_norm"]),
        "lengthscale": [float(v) for v in np.asarray(m["lengthscale"])],
        "outputscale": float(m["outputscale"]),
        "noise": float(m["noise"]),
        "mean": float(m["mean"]),
        "cg_iterations": int(m["cg_iterations"]),
        "cg_residual": res,
        "cg_converged": bool(res <= cfg.cg_tol),
        "passes": int(m["passes"]),
        "seconds": seconds,
    }


def _nonfinite_reason(epoch: int, m: dict) -> str:
    if not m["finite_loss"]:
        what = f"loss ({float(m['loss'])})"
    elif not m["finite_grad"]:
        what = f"gradient (norm {float(m['grad_norm'])})"
    else:
        what = "parameters after the optimiser update"
    return (
        f"non-finite {what} at epoch {epoch}; stopped and kept the parameters from before "
        f"that epoch (after epoch {epoch - 1})"
    )


def _cg_message(rec: dict, cfg: MLLConfig, dtype) -> str:
    hint = "" if dtype == jnp.float64 else ", or use float64 (model.dtype = 'float64')"
    return (
        f"CG reached relative residual {rec['cg_residual']:.3g} > cg_tol = {cfg.cg_tol:g} after "
        f"cg_max_iter = {cfg.cg_max_iter} iterations at epoch {rec['epoch']}: the loss and its "
        f"gradient are inexact. Raise cg_max_iter or precond_rank{hint}. Later epochs are "
        f"recorded in the history (cg_converged) without a further warning."
    )


def _replay_early_stopping(history, es: EarlyStopping | None):
    best, wait = math.inf, 0
    if es is not None:
        for rec in history:
            best, wait = _early_update(best, wait, rec["loss"], es)
    return best, wait


def _early_update(best, wait, loss, es: EarlyStopping):
    if loss < best - es.min_delta:
        return loss, 0
    return best, wait + 1


def _early_reason(epoch, es: EarlyStopping, best) -> str:
    return (
        f"early stopping after epoch {epoch}: loss did not improve on {best:.6g} by more than "
        f"{es.min_delta:g} for {es.patience} epochs"
    )


class _Progress:
    """A one-line progress display on stderr (no dependency): in place on a TTY."""

    def __init__(self, total: int, enabled: bool | None, log_every: int):
        tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else bool(enabled)
        self.tty = tty
        self.total = total
        self.log_every = max(1, int(log_every))
        self.shown = False

    def note(self, text: str):
        if self.enabled:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def update(self, rec: dict):
        if not self.enabled:
            return
        e = rec["epoch"]
        text = (
            f"epoch {e:>{len(str(self.total))}}/{self.total} loss {rec['loss']:+.5f} "
            f"|g| {rec['grad_norm']:.2e} noise {rec['noise']:.3g} cg {rec['cg_iterations']} it "
            f"{rec['seconds']:.2f} s"
        )
        if self.tty:
            width = 20
            done = int(width * e / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
            self.shown = True
        elif e % self.log_every == 0 or e == self.total:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def break_line(self):
        """End an in-place line so that a warning starts on its own line."""
        if self.enabled and self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False

    def close(self):
        if self.enabled and self.tty and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Checkpoints


def _fingerprint(X, y, kernel, backend, mll_config, seed, state, settings) -> dict:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(y)).tobytes())
    fp = {
        "n": int(X.shape[0]),
        "d": int(X.shape[1]),
        "dtype": str(X.dtype),
        "data_sha256": h.hexdigest(),
        "kernel": kernel,
        "backend": backend.name,
        "mll_config": asdict(mll_config),
        "seed": int(seed),
        "warm_start": state.last_alpha is not None,
        "opt_state": [
            [list(np.shape(a)), str(np.asarray(a).dtype)] for a in jax.tree.leaves(state.opt_state)
        ],
        "settings": None if settings is None else dict(settings),
    }
    return json.loads(json.dumps(fp))  # normalise (tuples -> lists) as it will be read back


def save_checkpoint(path, state: TrainState, history: list[dict], fingerprint: dict,
                    stopped_reason: str = "") -> None:
    """Write ``state``, ``history`` and ``fingerprint`` to ``path`` atomically (npz, no pickle).

    The file is written under a temporary name in the same folder, fsync'ed and renamed over
    ``path``, so a crash leaves either the old or the new checkpoint, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = state.key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    arrays = {
        "format": np.asarray(CHECKPOINT_FORMAT),
        "fingerprint": np.asarray(json.dumps(fingerprint)),
        "history": np.asarray(json.dumps(history)),
        "stopped_reason": np.asarray(stopped_reason),
        "epoch": np.asarray(state.epoch),
        "key": np.asarray(jax.random.key_data(key) if typed else key),
        "key_impl": np.asarray(str(jax.random.key_impl(key)) if typed else ""),
    }
    for i, a in enumerate(jax.tree.leaves(state.params)):
        arrays[f"params_{i}"] = np.asarray(a)
    for i, a in enumerate(jax.tree.leaves(state.opt_state)):
        arrays[f"opt_{i}"] = np.asarray(a)
    if state.last_alpha is not None:
        arrays["last_alpha"] = np.asarray(state.last_alpha)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_checkpoint(path, template: TrainState, fingerprint: dict | None = None):
    """Read a checkpoint into the structure of ``template`` -> ``(state, history)``.

    Raises FileNotFoundError if absent, ValueError if the file is not a gpadjoint checkpoint,
    if its fingerprint differs from ``fingerprint`` (each differing field is named) or if its
    arrays do not fit the template.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable gpadjoint checkpoint: {e}") from None
    if "format" not in data or str(data["format"]) != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} file")
    stored = json.loads(str(data["fingerprint"]))
    if fingerprint is not None and stored != fingerprint:
        diffs = [
            f"{k}: checkpoint {_short(stored.get(k))} vs now {_short(fingerprint.get(k))}"
            for k in sorted(set(stored) | set(fingerprint))
            if stored.get(k) != fingerprint.get(k)
        ]
        raise ValueError(
            f"checkpoint {path} was written for a different run and cannot be resumed: "
            + "; ".join(diffs)
            + ". Use the same data and settings, or resume=False (or another checkpoint path) "
            "to start afresh."
        )

    def restore(prefix, tree):
        leaves, treedef = jax.tree.flatten(tree)
        out = []
        for i, ref in enumerate(leaves):
            k = f"{prefix}_{i}"
            if k not in data:
                raise ValueError(f"{path}: missing {k}; the checkpoint does not fit this run")
            a = data[k]
            if a.shape != np.shape(ref) or a.dtype != np.asarray(ref).dtype:
                raise ValueError(
                    f"{path}: {k} has shape {a.shape} {a.dtype}, expected "
                    f"{np.shape(ref)} {np.asarray(ref).dtype}"
                )
            out.append(jnp.asarray(a))
        if f"{prefix}_{len(leaves)}" in data:
            raise ValueError(f"{path}: more {prefix} arrays than this run has")
        return jax.tree.unflatten(treedef, out)

    key = jnp.asarray(data["key"])
    impl = str(data["key_impl"])
    if impl:
        key = jax.random.wrap_key_data(key, impl=impl)
    last_alpha = None
    if template.last_alpha is not None:
        if "last_alpha" not in data:
            raise ValueError(f"{path}: no CG warm start stored, but warm_start is on")
        last_alpha = jnp.asarray(data["last_alpha"], template.last_alpha.dtype)
    state = TrainState(
        params=restore("params", template.params),
        opt_state=restore("opt", template.opt_state),
        epoch=jnp.asarray(data["epoch"], template.epoch.dtype),
        key=key,
        last_alpha=last_alpha,
    )
    history = json.loads(str(data["history"]))
    return state, history


def _short(v, limit=80) -> str:
    s = json.dumps(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."
