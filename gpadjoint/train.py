"""The training loop: :func:`fit` steps an optimiser's trainer and decides when to stop.

Data flow: mll -> optimizers -> **train** -> start -> model.

The parts live by job: :mod:`gpadjoint.optimizers` builds the pure ``init``/``step`` pair of
an optimiser (:class:`~gpadjoint.optimizers.Optax` for any optax transformation,
:class:`~gpadjoint.optimizers.LBFGS` for L-BFGS on the fixed-probe objective, whose host parts
are in :mod:`gpadjoint.lbfgs` and :mod:`gpadjoint.coords`); :mod:`gpadjoint.stops` holds the
stop rules; :mod:`gpadjoint.start` the starting point (subset ladder). :func:`fit` runs the loop
around them: history, progress (in place on a terminal, else ``logging`` records of the
"gpadjoint" logger), non-finite guard, CG diagnostics, the optimiser's stop rules and atomic,
resumable checkpoints (:mod:`gpadjoint.checkpoint`), all decided in one place per epoch.

Units: X, y are already normalised (:mod:`gpadjoint.data`) and in the working dtype; the loss is
``-log p(y | theta) / n`` per datum in those units; hyperparameters in the history are
constrained (lengthscales in standardised input units, output scale and noise as variances).

The optimiser names that used to live here (``make_trainer``, ``LBFGS``, ``to_opt``, ...) are
re-exported, so ``from gpadjoint.train import ...`` keeps working for them. The start's names
(``subset_start``, ``initial_params``, ...) are imported from :mod:`gpadjoint.start` only: start
imports :func:`fit` from here, so the graph runs one way (start -> train).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import load_checkpoint, run_fingerprint, save_checkpoint  # noqa: F401 (public)
from .coords import (  # noqa: F401 (re-exported)
    INPUT_RANGE,
    INV_LS_STEP,
    from_opt,
    opt_grad,
    to_opt,
)
from .coords import flat as _flat  # noqa: F401 (re-exported)
from .coords import unflat as _unflat  # noqa: F401 (re-exported)
from .kernels import Params, init_params
from .matvec import Backend
from .mll import MLLConfig
from .optimizers import (  # noqa: F401 (re-exported)
    LBFGS,
    LBFGSState,
    Optax,
    Trainer,
    TrainState,
    as_optimizer,
    make_lbfgs_trainer,
    make_trainer,
)
from .plan import resolve_backend, resolve_estimator
from .solve import CGConvergenceWarning
from .stops import EarlyStopping

logger = logging.getLogger("gpadjoint")

class FitResult(NamedTuple):
    """Outcome of :func:`fit`.

    params: final unconstrained parameters (the last finite ones).
    history: one dict per completed epoch (below).
    stopped_reason: why the loop ended, in words.
    state: final :class:`TrainState` (resume from it with :meth:`Trainer.step`).
    info: backend and the reason it was chosen, fingerprint, compile seconds, checkpoint path.

    History records: ``epoch`` (1-based), ``loss`` (per datum), ``grad_norm`` (of the raw
    parameters), ``lengthscale`` (list), ``outputscale``, ``noise``, ``mean`` -- all evaluated at
    the parameters *entering* that epoch, so loss and hyperparameters belong together -- then
    ``cg_iterations``, ``cg_residual`` (relative), ``cg_converged``, ``passes`` (passes over the
    n^2 kernel pairs for that value and gradient; 0 for the exact estimator) and ``seconds``
    (wall time of the step, compilation excluded; it is in ``info["compile_seconds"]``). An
    L-BFGS step adds ``evaluations``, ``step_size``, ``new_loss``, ``new_grad_norm`` (at the
    accepted point), ``refreshed`` and ``cg_capped`` (trial points whose CG the line search
    stopped at its bound, :data:`gpadjoint.optimizers.TRIAL_CG_FACTOR`; their residuals are
    not in ``cg_residual``).
    """

    params: Params
    history: list[dict]
    stopped_reason: str
    state: TrainState
    info: dict


def fit(
    X,
    y,
    *,
    kernel: str = "matern32",
    backend: Backend | str = "auto",
    mll_config: MLLConfig | None = None,
    optimizer: Any = None,
    epochs: int,
    params0: Params | None = None,
    seed: int = 0,
    early_stopping: EarlyStopping | None = None,
    checkpoint_path=None,
    checkpoint_every: int = 10,
    checkpoint_seconds: float = 300.0,
    resume: bool = False,
    progress: bool | None = None,
    callback: Callable[[dict, TrainState], Any] | None = None,
    warm_start: bool = True,
    settings: Mapping | None = None,
    log_every: int = 1,
    converge_tol: float = 1e-5,
    stop: Callable[[], bool] | None = None,
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
        optimizer: an optimiser of the :mod:`gpadjoint.optimizers` protocol (``LBFGS(...)``,
            ``Optax(tx)``) or any optax transformation (default ``optax.adam(0.05)``); its
            stop rules (:meth:`~gpadjoint.optimizers.LBFGS.stop_rules`) apply.
        epochs: total number of epochs of the run (including those of a resumed checkpoint).
        params0: starting unconstrained parameters (default: raw values 0).
        seed: the run's PRNG seed (probes of epoch e from ``fold_in(PRNGKey(seed), e)``).
        early_stopping: :class:`EarlyStopping` or None (off); L-BFGS has its own rule.
        checkpoint_path: file to write checkpoints to (atomically), or None.
        checkpoint_every: epochs between checkpoints (0: none by count; the end of the loop
            always writes one).
        checkpoint_seconds: also write one after any epoch that ends this many seconds (wall
            time) or more after the last one was written (or the loop began), whatever
            ``checkpoint_every`` says, so that a killed run loses at most that much work
            (0: off).
        resume: continue from ``checkpoint_path`` (must exist and match this run's fingerprint).
        progress: None: an in-place progress line when stderr is a terminal, else INFO
            records of the "gpadjoint" logger every ``log_every`` epochs; True: the same, and
            those records go to stderr even when logging is not configured; False: silent.
        callback: called as ``callback(record, state)`` after each epoch; returning True stops.
        warm_start: CG starts from the previous epoch's solution.
        settings: extra JSON-serialisable settings (e.g. the run's config without its epoch
            count) stored in the checkpoint fingerprint; a resume must pass equal settings.
        log_every: epochs between progress records when stderr is not a terminal.
        stop: a stop request, asked before every step and, by L-BFGS, before every evaluation
            of its line search: True abandons the step in progress, keeps the state of the last
            accepted step (checkpointed as the loop ends) and ``info["stop_requested"]`` is
            True. A resumed run then ends where an uninterrupted one ends.
        converge_tol: with the exact (deterministic) estimator and no ``early_stopping``
            given, stop once the loss has not improved by ``converge_tol`` for 5 epochs
            (converged); 0 turns this off. Ignored with SLQ, whose loss is stochastic, and
            by L-BFGS, which has its own rule.

    Returns:
        :class:`FitResult` (its docstring lists the history records' keys).

    A non-finite loss, gradient or update stops the loop before that update is applied: the
    result holds the last finite parameters and ``stopped_reason`` names the epoch and cause.
    """
    _check_seconds(checkpoint_seconds)
    run = _prepare(X, y, kernel=kernel, backend=backend, mll_config=mll_config,
                   optimizer=optimizer, epochs=epochs, params0=params0, seed=seed,
                   early_stopping=early_stopping, checkpoint_path=checkpoint_path,
                   checkpoint_every=checkpoint_every, resume=resume, warm_start=warm_start,
                   settings=settings, converge_tol=converge_tol)
    return _execute(run, epochs, progress, log_every, checkpoint_path, checkpoint_every,
                    checkpoint_seconds, callback, stop)


class _Run(NamedTuple):
    trainer: Trainer
    state: TrainState
    history: list
    rules: list
    mll_config: MLLConfig
    info: dict
    summary: str


def _execute(run: _Run, epochs, progress, log_every, checkpoint_path, checkpoint_every,
             checkpoint_seconds, callback, stop) -> FitResult:
    """Run the loop of :func:`fit` on a prepared run: progress, checkpoints, stop request."""
    bar = _Progress(epochs, progress, log_every)
    bar.note(run.summary)
    ckpt = _Checkpoints(checkpoint_path, checkpoint_every, run.info["fingerprint"],
                        checkpoint_seconds)
    asked = _Asked(stop)
    try:
        state, stopped_reason = _loop(run.trainer, run.state, run.history, epochs, run.rules,
                                      bar, ckpt, callback, run.mll_config, asked)
    finally:
        bar.close()
    run.info["stop_requested"] = asked.yes
    ckpt.final(state, run.history, stopped_reason)
    return FitResult(state.params, run.history, stopped_reason, state, run.info)


def _prepare(X, y, *, kernel, backend, mll_config, optimizer, epochs, params0, seed,
             early_stopping, checkpoint_path, checkpoint_every, resume, warm_start, settings,
             converge_tol) -> _Run:
    """Check the arguments and build the run: backend, estimator, optimiser, trainer, state.

    The trainer is compiled and, when resuming, the checkpoint loaded here.
    """
    X, y = jnp.asarray(X), jnp.asarray(y)
    _check_args(X, y, epochs, checkpoint_every, resume, checkpoint_path)
    n, d = X.shape
    dtype = X.dtype
    mll_config = MLLConfig() if mll_config is None else mll_config
    optimizer = as_optimizer(optimizer)
    # "auto" is resolved here, once, for callers that bypass the plan (gpadjoint.plan)
    backend, backend_reason = resolve_backend(backend, kernel, n, dtype, d=d,
                                              rank=mll_config.precond_rank)
    mll_config, estimator_reason = resolve_estimator(n, mll_config)
    estimator = mll_config.estimator
    if estimator == "exact" and early_stopping is None and converge_tol > 0:
        early_stopping = EarlyStopping(patience=5, min_delta=float(converge_tol))
    trainer = optimizer.trainer(X, y, backend=backend, mll_config=mll_config,
                                warm_start=warm_start)
    params0 = init_params(d, dtype) if params0 is None else params0
    state = trainer.init(params0, jax.random.PRNGKey(seed))
    fingerprint = run_fingerprint(X, y, kernel, backend, mll_config, seed, state, settings)
    history: list[dict] = []
    if resume:
        state, history = load_checkpoint(checkpoint_path, state, fingerprint)
    compile_seconds = trainer.compile(state)
    info = {
        "backend": backend.name, "backend_reason": backend_reason,
        "estimator": estimator, "estimator_reason": estimator_reason,
        "kernel": kernel, "dtype": str(dtype), "n": n, "d": d, "seed": seed,
        "compile_seconds": compile_seconds,
        "checkpoint_path": None if checkpoint_path is None else str(checkpoint_path),
        "resumed_from_epoch": int(state.epoch) if resume else None,
        "fingerprint": fingerprint,
    }
    summary = (
        f"gpadjoint fit: n={n} d={d} {dtype} kernel={kernel} backend={backend.name} "
        f"({backend_reason}); estimator {estimator} ({estimator_reason}); "
        f"step compiled in {compile_seconds:.1f} s"
    )
    return _Run(trainer, state, history, optimizer.stop_rules(early_stopping), mll_config,
                info, summary)


class _Asked:
    """The loop's stop request: ``stop()`` of :func:`fit`, remembering whether it said True."""

    def __init__(self, stop: Callable[[], bool] | None):
        self.stop, self.yes = stop, False

    def __call__(self) -> bool:
        if self.stop is not None and not self.yes and self.stop():
            self.yes = True
        return self.yes


def _loop(trainer: Trainer, state: TrainState, history: list[dict], epochs: int, rules: list,
          bar, ckpt, callback, cfg: MLLConfig, asked: _Asked | None = None,
          ) -> tuple[TrainState, str]:
    """Step until ``epochs``, a halt, a stop rule, the callback or a stop request.

    Returns (state, reason). ``history`` is appended to in place; the rules first replay it (a
    resumed run that had already stopped does not continue). A stop request abandons the step
    in progress (the trainer returns its state unchanged), so ``state`` is the last accepted.
    """
    asked = _Asked(None) if asked is None else asked
    replayed = [r.replay(history) for r in rules]
    start = int(state.epoch)
    for reason in replayed:
        if reason:
            return state, reason  # the checkpointed run had already stopped
    if start >= epochs:
        return state, f"the checkpoint is already at epoch {start} (epochs={epochs})"
    cg_warned = False
    for e in range(start, epochs):
        if asked():
            return state, f"stop requested before step {e + 1}; kept the point after epoch {e}"
        t0 = time.perf_counter()
        new_state, m = (trainer.step(state) if asked.stop is None
                        else trainer.step(state, stop=asked))
        m = jax.device_get(m)
        seconds = time.perf_counter() - t0
        if m.get("interrupted"):
            return state, (f"stop requested during step {e + 1}: abandoned after "
                           f"{int(m.get('evaluations', 0))} evaluations; kept the last accepted "
                           f"point (after epoch {e})")
        halt, keep_new = _halt(e + 1, m)
        if halt:
            return (new_state if keep_new else state), halt
        state = new_state
        rec = _record(e + 1, m, seconds, cfg)
        history.append(rec)
        if not rec["cg_converged"] and not cg_warned:
            cg_warned = True
            bar.break_line()
            warnings.warn(_cg_message(rec, cfg, state.params.mean.dtype), CGConvergenceWarning,
                          stacklevel=3)
        bar.update(rec)
        ckpt.after_epoch(state, history)
        for rule in rules:
            reason = rule.update(rec)
            if reason:
                return state, reason
        if callback is not None and callback(rec, state) is True:
            return state, f"callback requested a stop after epoch {e + 1}"
    return state, f"completed {epochs} epochs"


class _Checkpoints:
    """The loop's checkpoint decision, in one place.

    Every ``every`` epochs, after any epoch that ends ``seconds`` or more after the last write
    (or the loop's start), and at the end.
    """

    def __init__(self, path, every: int, fingerprint: dict, seconds: float = 0.0):
        self.path, self.every, self.fingerprint = path, every, fingerprint
        self.seconds = seconds
        self.last = time.monotonic()

    def after_epoch(self, state: TrainState, history: list[dict]) -> None:
        """Write one when the epoch is a multiple of ``every`` or ``seconds`` have passed."""
        if self.path is None:
            return
        by_count = self.every and int(state.epoch) % self.every == 0
        by_time = self.seconds and time.monotonic() - self.last >= self.seconds
        if by_count or by_time:
            save_checkpoint(self.path, state, history, self.fingerprint)
            self.last = time.monotonic()

    def final(self, state: TrainState, history: list[dict], reason: str) -> None:
        """Write one with the reason the loop ended (always, when a path is given)."""
        if self.path is not None:
            save_checkpoint(self.path, state, history, self.fingerprint, reason)


def _halt(epoch: int, m: dict) -> tuple[str | None, bool]:
    """(reason, keep the step's state) when a step's metrics end the run, else (None, False).

    A non-finite loss, gradient or update keeps the state from before the step; an L-BFGS line
    search without a decrease keeps the step's state (the parameters are unchanged, the
    evaluation it made is kept).
    """
    if not m["ok"]:
        return _nonfinite_reason(epoch, m), False
    if not m.get("linesearch_ok", True):
        return (
            f"L-BFGS line search found no decrease of the loss in {m['evaluations']} "
            f"evaluations at step {epoch} (gradient norm {float(m['grad_norm']):.3g}): the "
            "objective is resolved as far as its CG tolerance allows; parameters kept"
        ), True
    return None, False


def _check_args(X, y, epochs, checkpoint_every, resume, checkpoint_path):
    _check_data(X, y)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(f"checkpoint_every must be an int, got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")


def _check_seconds(seconds):
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            seconds >= 0 and np.isfinite(seconds)):
        raise ValueError(f"checkpoint_seconds must be a finite number >= 0 (0: off), got "
                         f"{seconds!r}")


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


_LBFGS_KEYS = ("evaluations", "step_size", "new_loss", "new_grad_norm", "refreshed",
               "deepened", "lanczos_depth", "depth_change", "predicted_decrease",
               "precond_builds", "cg_capped")


def _record(epoch: int, m: dict, seconds: float, cfg: MLLConfig) -> dict:
    res = float(m["cg_residual"])
    kinds = {"evaluations": int, "refreshed": bool, "deepened": bool, "lanczos_depth": int,
             "precond_builds": int, "cg_capped": int}
    extra = {k: kinds.get(k, float)(m[k]) for k in _LBFGS_KEYS if k in m}
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
    } | extra


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


class _Progress:
    """Progress of a fit on stderr: in place on a terminal, else ``logging`` records.

    ``enabled`` None: the in-place line on a terminal; elsewhere one INFO record of the
    "gpadjoint" logger every ``log_every`` epochs (and at the last), shown wherever the
    application's logging configuration sends them. True: the same, and when stderr is not a
    terminal and no handler already writes the logger's records there, a plain one is attached
    for the fit (removed afterwards). False: nothing.
    """

    def __init__(self, total: int, enabled: bool | None, log_every: int):
        tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
        on = enabled is not False
        self.tty, self.bar, self.log = tty, on and tty, on and not tty
        self.total = total
        self.log_every = max(1, int(log_every))
        self.shown = False
        self.handler, self.level = None, None
        if self.log and enabled and not _writes_to_stderr(logger):
            self.handler = logging.StreamHandler(sys.stderr)
            self.handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(self.handler)
            if not logger.isEnabledFor(logging.INFO):
                self.level = logger.level
                logger.setLevel(logging.INFO)

    def note(self, text: str):
        if self.bar:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        elif self.log:
            logger.info(text)

    def update(self, rec: dict):
        e = rec["epoch"]
        text = (
            f"epoch {e:>{len(str(self.total))}}/{self.total} loss {rec['loss']:+.5f} "
            f"|g| {rec['grad_norm']:.2e} noise {rec['noise']:.3g} cg {rec['cg_iterations']} it "
            f"{rec['seconds']:.2f} s"
        )
        if self.bar:
            width = 20
            done = int(width * e / self.total)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
            sys.stderr.flush()
            self.shown = True
        elif self.log and (e % self.log_every == 0 or e == self.total):
            logger.info(text)

    def break_line(self):
        """End an in-place line so that a warning starts on its own line."""
        if self.bar and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False

    def close(self):
        self.break_line()
        if self.handler is not None:
            logger.removeHandler(self.handler)
            if self.level is not None:
                logger.setLevel(self.level)
            self.handler = None


def _writes_to_stderr(log: logging.Logger) -> bool:
    """Whether a handler on ``log`` or its ancestors already writes to stderr."""
    node = log
    while node is not None:
        for h in node.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__):
                return True
        node = node.parent if node.propagate else None
    return False
