"""GPRegressor: a scikit-learn estimator around the trainer and the posterior.

Data flow: train / predict -> plan -> **model** -> cli. :class:`GPRegressor` follows scikit-learn's
conventions: ``__init__`` only stores its keyword arguments, ``fit`` validates, standardises,
trains (:func:`gpadjoint.train.fit`) and returns ``self``; fitted state ends in ``_``;
``predict(X, return_std=False)``; ``score`` is R^2 (``RegressorMixin``).

Units. Internally the GP sees ``X_n = (X - x_mean_) / x_std_`` (training statistics; constant
columns get std 1) and ``y_n = (y - y_mean_) / y_std_`` (``y_std_`` = 1 unless
``normalize_y``). ``params_`` and ``alpha_`` live in those internal units; ``noise_floor`` is a
variance in internal units. ``hyperparameters_`` and everything ``predict`` returns are in the
original units of X and y.

A fitted model is saved to one ``.npz`` file (:meth:`GPRegressor.save`: plain arrays plus JSON
metadata, no pickle, written atomically) that holds everything prediction needs -- training
data, normalisation, parameters and the mean weights alpha -- so :meth:`GPRegressor.load`
predicts the same numbers without refitting.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from . import predict as gpred
from ._io import check_writable
from .config import RunConfig, default_config, keywords, load_config
from .data import hyperparameters_in_data_units
from .kernels import Params, constrain
from .matvec import make_backend
from .mll import MLLConfig
from .persist import MODEL_FORMAT, load_model, save_model  # noqa: F401 (MODEL_FORMAT public)
from .plan import Choice, backend_precision, make_plan, recheck_prediction
from .sharding import make_mesh, shard_rows

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(est, *args, **kwargs):
        return est._validate_data(*args, **kwargs)


# GPRegressor's run settings: one keyword per key of a run configuration (config.keywords)
SETTINGS = tuple(keywords())


def _x64(method):
    """Run ``method`` with JAX's 64-bit mode on, for this call only (``jax.enable_x64``).

    The estimator's float64 paths (``dtype="float64"``, the exact estimator, float64 prediction)
    need it; scoping it here keeps ``import gpadjoint`` free of global side effects.
    """

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return method(*args, **kwargs)

    return wrapper


def _finite_kwarg() -> str:
    import inspect

    from sklearn.utils.validation import check_array

    params = inspect.signature(check_array).parameters
    return "ensure_all_finite" if "ensure_all_finite" in params else "force_all_finite"


_NO_FINITE_CHECK = {_finite_kwarg(): False}  # we check ourselves, naming rows and columns


def _check_finite(A: np.ndarray, what: str) -> None:
    """Raise ValueError naming the rows (and columns) that hold NaN or inf."""
    bad = ~np.isfinite(A)
    if not bad.any():
        return
    bad2 = bad.reshape(len(A), -1)
    rows = np.flatnonzero(bad2.any(axis=1))
    cols = np.flatnonzero(bad2.any(axis=0))
    more = f" (first 10 of {len(rows)})" if len(rows) > 10 else ""
    where = f"rows {rows[:10].tolist()}{more}"
    if A.ndim == 2:
        where += f", columns {cols[:10].tolist()}"
    raise ValueError(
        f"{what} contains {int(bad.sum())} NaN/inf value(s) in {where} (0-based); "
        "drop or impute them"
    )


def _view(choice: str) -> tuple[property, property]:
    """Return (name, reason) properties reading the plan's ``choice`` (fitted attributes).

    Setting one replaces that choice in ``plan_`` (e.g. ``model.variance_ = "love"`` after a fit
    switches prediction's variance engine); its reason then says so.
    """

    def name(self):
        return getattr(self.plan_, choice).name

    def set_name(self, value):
        self.plan_ = dataclasses.replace(self.plan_, **{choice: Choice(value, "set after the fit")})

    def reason(self):
        return getattr(self.plan_, choice).reason

    def set_reason(self, value):
        old = getattr(self.plan_, choice)
        self.plan_ = dataclasses.replace(self.plan_, **{choice: old._replace(reason=value)})

    return property(name, set_name), property(reason, set_reason)


class GPRegressor(RegressorMixin, BaseEstimator):
    """Gaussian-process regression with hyperparameters fitted by SLQ and the Lanczos adjoint.

    Settings: every key of a run configuration is a keyword argument, under the flat name of
    :func:`gpadjoint.config.keywords` (the TOML key; [predict] cg_tol is ``predict_cg_tol``), and
    its meaning is the one documented in ``gpadjoint/default.toml``. ``None`` (the default of
    each) means "the value of ``config``", and ``config=None`` means the packaged defaults, so
    ``GPRegressor()`` fits exactly as ``gpadjoint fit`` without ``--config`` does, and
    ``GPRegressor(config="configs/paper.toml")`` as ``gpadjoint fit --config configs/paper.toml``.
    The resolved settings are :meth:`run_config` (and ``config_`` after fitting). The most used:

    - ``kernel``: "matern32", "matern12", "matern52" or "rbf", with ARD lengthscales.
    - ``backend``: "auto" (:func:`gpadjoint.matvec.choose_backend`, reported in ``backend_``),
      "dense", "stored" (K held once, gradient by recomputed tiles; one device), "blocked" or
      "keops"; ``precision``: "mixed" holds the blocked backend's kernel entries in float32
      (sums and Krylov vectors stay in ``dtype``), "full" does not.
    - ``estimator``: "auto" (exact float64 Cholesky for n <= ``exact_max_n``, SLQ above; in
      ``estimator_``), "slq" or "exact"; ``num_probes``, ``lanczos_depth``, ``precond_rank``,
      ``cg_tol``, ``cg_min_iter``, ``cg_max_iter``, ``precond_logdet``: the SLQ estimator
      (:class:`gpadjoint.settings.MLLConfig`; depth, rank and cg_min_iter are clamped to n).
    - ``optimizer``: "auto" (L-BFGS), "adam", "adamw", "sgd", "lbfgs", or any
      ``optax.GradientTransformation`` (then ``lr`` and the schedule keys are ignored);
      ``epochs``: optimiser steps (0 keeps the starting parameters).
    - ``dtype``: "float64" or "float32"; ``normalize_y``: divide y by its training std (y is
      always centred, whatever it says: the constant mean is fitted on centred targets);
      ``noise_floor``: lower bound of the noise variance in internal units.
    - ``random_state``: the run's seed, an int (probes, ``init = "normal"``, the
      ``init_subset`` rows). As every keyword, None takes the config's ``[train]
      random_state`` (0 in the packaged defaults), so a fit is reproducible unless a seed is
      varied on purpose; the seed used is ``random_state_``.
      ``init_subset``: start from the exact fit of that many random rows (doubled while that
      fit interpolates them, up to ``init_subset_max``); ``full_fit``: then fit
      all rows ("always"), keep that subset fit ("never"), or "auto": always, unless the
      estimator is SLQ and the subset fit interpolates (then every full-n CG solve runs to
      hundreds of passes; ``full_fit_`` says which and why).
    - ``posterior``: "auto" (the exact posterior by blocked float64 Cholesky when its n x n
      array fits in memory, else CG; in ``posterior_``), "exact" or "cg"; ``variance``,
      ``love_rank``, ``predict_cg_tol``, ``max_cg_iter``, ``batch_size``: the CG posterior
      (:mod:`gpadjoint.predict`).

    Two keywords are not run settings: ``devices`` (None: one device; N or "all": shard the rows
    of the data and of every kernel block and Lanczos / CG vector over that many devices,
    :mod:`gpadjoint.sharding`, described in ``mesh_``) and ``verbose`` (print the choices and a
    progress line while training).

    Fitted attributes: ``config_`` (the resolved :class:`~gpadjoint.config.RunConfig`),
    ``params_`` (unconstrained, internal units), ``alpha_`` (K^{-1}(y_n - mu)),
    ``hyperparameters_`` (original units), ``X_train_``, ``y_train_`` (as given), ``x_mean_``,
    ``x_std_``, ``y_mean_``, ``y_std_``, ``backend_``, ``backend_reason_``, ``mesh_``,
    ``mesh_record_``, ``estimator_``, ``estimator_reason_``, ``optimizer_``,
    ``optimizer_reason_``, ``variance_``, ``variance_reason_``, ``history_``,
    ``stopped_reason_``, ``n_iter_``, ``random_state_`` (the seed used), ``init_subset_`` (the
    subset start's summary or None), ``full_fit_`` (whether all rows were fitted after it, and why),
    ``fit_seconds_`` (start and training), ``fit_info_`` (the trainer's info: compile
    seconds, fingerprint), ``solve_info_`` (the mean weights' solve: iterations, residual,
    seconds), ``n_features_in_``, ``posterior_`` and ``posterior_reason_`` (exact or cg, and
    why), ``predict_dtype_`` and ``solver_`` (``"float64"`` and ``"cholesky"`` for the exact
    posterior; else ``"cg"``, in float64 after the exact estimator and in ``dtype`` otherwise).
    """

    def __init__(
        self,
        *,
        config=None,
        kernel=None,
        backend=None,
        dtype=None,
        noise_floor=None,
        tile=None,
        precision=None,
        normalize_y=None,
        num_probes=None,
        lanczos_depth=None,
        precond_rank=None,
        precond_pivot=None,
        cg_tol=None,
        cg_min_iter=None,
        cg_max_iter=None,
        estimator=None,
        exact_max_n=None,
        precond_logdet=None,
        depth_tol=None,
        max_lanczos_depth=None,
        optimizer=None,
        lr=None,
        schedule=None,
        decay_epochs=None,
        final_lr_fraction=None,
        decay_rate=None,
        warmup_epochs=None,
        b1=None,
        b2=None,
        eps=None,
        momentum=None,
        weight_decay=None,
        clip_norm=None,
        lbfgs_memory=None,
        lbfgs_rtol=None,
        lbfgs_gtol=None,
        lbfgs_ptol=None,
        epochs=None,
        random_state=None,
        early_stopping=None,
        patience=None,
        min_delta=None,
        checkpoint_every=None,
        checkpoint_seconds=None,
        init=None,
        log_every=None,
        converge_tol=None,
        init_subset=None,
        init_subset_max=None,
        full_fit=None,
        posterior=None,
        predict_cg_tol=None,
        max_cg_iter=None,
        variance=None,
        love_rank=None,
        batch_size=None,
        devices=None,
        verbose=False,
    ):
        # scikit-learn: __init__ stores its arguments and nothing else (an old keyword, seed or
        # scale_y, is Python's TypeError; scikit-learn's checks forbid a **kwargs to catch it)
        for name, value in dict(locals()).items():
            if name not in ("self", "__class__"):
                setattr(self, name, value)

    # --- settings -----------------------------------------------------------------------------

    def run_config(self) -> RunConfig:
        """Return the settings this estimator fits with: ``config`` with the keywords set.

        Raises ValueError naming the setting when one is invalid.
        """
        base = self.config
        if base is None:
            base = default_config()
        elif isinstance(base, (str, Path)):
            base = load_config(base)
        elif not isinstance(base, RunConfig):
            raise ValueError(
                f"config must be None (the packaged defaults), a RunConfig or the path of a TOML "
                f"file, got {type(base).__name__}"
            )
        kw = {k: _plain(getattr(self, k)) for k in SETTINGS}
        if isinstance(kw["optimizer"], optax.GradientTransformation):
            kw["optimizer"] = None  # used as given; the [optim] keys do not apply
        return base.with_keywords(**kw)

    def _validate_fit(self, X, y):
        if y is not None:
            y_arr = np.asarray(y)  # sklearn checks y itself but without naming the rows
            if y_arr.dtype.kind == "f" and y_arr.ndim in (1, 2):
                _check_finite(y_arr, "y")
        X, y = _validate_data(
            self, X, y, y_numeric=True, dtype=np.float64, ensure_min_samples=2,
            **_NO_FINITE_CHECK,
        )
        _check_finite(X, "X")
        _check_finite(y, "y")
        return X, np.asarray(y, np.float64)

    def _validate_predict(self, X):
        X = _validate_data(self, X, reset=False, dtype=np.float64, **_NO_FINITE_CHECK)
        _check_finite(X, "X")
        return X

    # --- fit ----------------------------------------------------------------------------------

    @_x64
    def fit(self, X, y, *, checkpoint=None, resume=False, callback=None, settings=None,
            progress=None, stop=None):
        """Fit the hyperparameters to X (n, d) and y (n,) and precompute the posterior mean.

        Keyword-only, for long runs (the command line uses them): ``checkpoint`` (a file to
        write resumable checkpoints to, every ``checkpoint_every`` epochs and at the end),
        ``resume`` (continue from it; the data and settings must match), ``callback``
        (``callback(record, state)`` after each epoch; True stops the fit, and the posterior is
        then not solved: ``alpha_`` is None until a fit completes), ``settings`` (extra JSON
        settings stored in the checkpoint's fingerprint), ``progress`` (None: as ``verbose``;
        True, False, or "auto": a progress line when stderr is a terminal), ``stop`` (a
        callable asked before every loss evaluation, of the subset start's fits too: True
        abandons the step in progress, checkpoints the last accepted point, or the start's last
        finished stage, and ends the fit as the callback does). A ``checkpoint``
        that cannot be written is refused before any work (:class:`~gpadjoint._io.WriteError`,
        an OSError naming the path and the reason), and so is a failed checkpoint write later.

        Returns self.
        """
        from .data import normalisation

        cfg = self.run_config()
        X, y = self._validate_fit(X, y)
        if checkpoint is not None:  # refused now, not at the first checkpoint after hours
            check_writable(checkpoint, "checkpoint")
        self.config_ = cfg
        say = print if self.verbose else (lambda *a, **k: None)
        x_mean, x_std, y_mean, y_std = normalisation(X, y, cfg.model.normalize_y)
        self.X_train_, self.y_train_ = X, y
        self.x_mean_, self.x_std_, self.y_mean_, self.y_std_ = x_mean, x_std, y_mean, y_std
        backend, optimizer = self._plan(*X.shape, say)

        t0 = time.time()
        params, interrupted = self._train(backend, optimizer, say, checkpoint=checkpoint,
                                          resume=resume, callback=callback, settings=settings,
                                          progress=progress, stop=stop)
        self.fit_seconds_ = time.time() - t0
        say(f"stopped: {self.stopped_reason_}")
        self.n_iter_ = len(self.history_)
        self.params_ = Params(*(np.asarray(p) for p in params))
        self.hyperparameters_ = self._hyperparameters()
        self._love_cache = {}
        if interrupted:
            self.alpha_, self.solve_info_ = None, None
        else:
            self.plan_ = recheck_prediction(self.plan_, cfg)
            self._solve_alpha(backend)
        return self

    def _plan(self, n: int, d: int, say):
        """Make, keep (``plan_``) and report the plan; -> (backend, optimiser) it names."""
        from .optimizers import make_optimizer

        cfg = self.config_
        given = self.optimizer if isinstance(self.optimizer, optax.GradientTransformation) else None
        self.plan_ = plan = make_plan(cfg, n, d, devices=self.devices, optimizer=given)
        for line in plan.lines():
            say(line)
        backend = make_backend(plan.backend.name, cfg.model.kernel, tile=cfg.model.tile,
                               mesh=make_mesh(self.devices),
                               precision=backend_precision(plan.backend.name, cfg.model))
        if given is not None:
            return backend, given
        optim = dataclasses.replace(cfg.optim, optimizer=plan.optimizer.name)
        return backend, make_optimizer(optim, cfg.train.epochs, plan.estimator.name)

    # --- the plan's choices, as fitted attributes (views of ``plan_``) -------------------------

    backend_, backend_reason_ = _view("backend")
    estimator_, estimator_reason_ = _view("estimator")
    optimizer_, optimizer_reason_ = _view("optimizer")
    posterior_, posterior_reason_ = _view("posterior")
    variance_, variance_reason_ = _view("variance")
    mesh_ = property(lambda self: self.plan_.mesh.name)
    mesh_record_ = property(lambda self: self.plan_.mesh_record)

    def _train(self, backend, optimizer, say, *, checkpoint, resume, callback, settings,
               progress, stop=None):
        """Train from the configured start (subset start included) -> (params, interrupted).

        The subset start is checkpointed beside ``checkpoint`` (its stages, then its metric) and
        resumed from there when the full fit had not yet written ``checkpoint``.
        """
        from .checkpoint import start_path
        from .optimizers import as_optimizer, drop_anchor_factors
        from .start import full_fit, initial_params, precond_ratio, subset_metric, subset_start

        cfg = self.config_
        mc, tc = cfg.model, cfg.train
        Xn, yn = self._internal_train(jnp.dtype(mc.dtype))
        n, d = Xn.shape
        self.random_state_ = seed = tc.random_state
        params0 = initial_params(tc.init, d, jnp.dtype(mc.dtype), seed)
        self.init_subset_ = None
        # a checkpoint belongs to these settings (all but the epoch count and prediction's)
        run = {k: v for k, v in cfg.to_dict().items() if k != "predict"}
        run["train"] = {k: v for k, v in run["train"].items() if k != "epochs"}
        start_ckpt = start_path(checkpoint)
        resume_fit = resume and checkpoint is not None and Path(checkpoint).exists()
        if tc.init_subset and n > tc.init_subset and not resume_fit and tc.epochs > 0:
            # an SLQ fit of all rows follows: measure how hard its CG would be from each rung
            mll = self._mll_config(n)
            check = (None if self.estimator_ != "slq" else functools.partial(
                precond_ratio, Xn, kernel=mc.kernel, config=mll))
            params0, self.init_subset_ = subset_start(
                Xn, yn, params0, kernel=mc.kernel, size=tc.init_subset, seed=seed,
                noise_floor=mc.noise_floor, max_size=tc.init_subset_max, metric=False,
                checkpoint=start_ckpt, resume=resume, stop=stop,
                settings={"config": run, **(settings or {})}, cg_check=check)
            i = self.init_subset_
            if i.get("interrupted"):
                self.history_, self.fit_info_ = [], {}
                self.stopped_reason_ = i["stopped_reason"]
                self.full_fit_ = {"fit": True, "mode": tc.full_fit,
                                  "reason": "not reached: stopped during the subset start"}
                return params0, True
            sizes = " -> ".join(str(st["size"]) for st in i["stages"])
            say(f"start: exact fit on {sizes} random rows ({i['evaluations']} evaluations, "
                f"{i['seconds']:.1f} s, loss {i['loss']:.4f}, noise {i['noise']:.2e}"
                f"{', interpolating' if i['interpolating'] else ''}"
                + (f", CG ratio {i['precond_ratio']:.1e}" if "precond_ratio" in i else "")
                + ")")
        self.full_fit_ = full_fit(tc.full_fit, self.init_subset_, self.estimator_, n)
        if not self.full_fit_["fit"]:
            drop_anchor_factors()
            say(f"full fit: skipped ({self.full_fit_['reason']})")
            if self.init_subset_ is not None and self.init_subset_["interpolating"]:
                params0 = self._heldout_noise(Xn, yn, params0, say)
            self.history_, self.fit_info_ = [], {}
            self.stopped_reason_ = f"kept the subset start: {self.full_fit_['reason']}"
            return params0, False
        optimizer = as_optimizer(optimizer)
        if self.init_subset_ is not None and optimizer.takes_metric:
            # L-BFGS in the coordinates the subset's Hessian whitens (LBFGS.metric); a resumed
            # run takes them from its checkpoint. Only now: a kept start needs no metric
            self.init_subset_ = subset_metric(Xn, yn, params0, self.init_subset_,
                                              kernel=mc.kernel, noise_floor=mc.noise_floor,
                                              checkpoint=start_ckpt)
            optimizer = optimizer.with_metric(self.init_subset_.pop("metric"))
        if tc.epochs == 0:
            self.history_, self.stopped_reason_ = [], "epochs=0: not trained"
            self.fit_info_ = {}
            return params0, False
        # resumed from the full fit's checkpoint, or the start's (then the fit starts anew)
        return self._fit_all(Xn, yn, params0, backend, optimizer, checkpoint=checkpoint,
                             resume=resume_fit or (resume and self.init_subset_ is None),
                             callback=callback, progress=progress,
                             settings={"config": run, **(settings or {})}, stop=stop)

    def _heldout_noise(self, Xn, yn, params, say) -> Params:
        """Kept interpolating start: its noise by held-out rows (:func:`start.heldout_noise`)."""
        from .start import heldout_noise

        mc = self.config_.model
        params, held = heldout_noise(Xn, yn, params, self.init_subset_, kernel=mc.kernel,
                                     noise_floor=mc.noise_floor)
        self.init_subset_["heldout_noise"] = held
        say(f"held-out noise: {held['rows']} rows outside the subset score the fitted noise "
            f"{held['fitted_noise']:.2e} at NLL {held['fitted_nll']:.4f}; "
            + (f"noise {held['noise']:.2e} scores {min(held['shares'].values()):.4f} and "
               "replaces it" if held["replaced"] else "kept"))
        return params

    def _fit_all(self, Xn, yn, params0, backend, optimizer, *, checkpoint, resume, callback,
                 progress, settings, stop):
        """Fit all rows from ``params0`` -> (params, interrupted), keeping the fit's records.

        ``settings`` are the checkpoint's (the run's config and the caller's); ``interrupted``
        is True when ``callback`` or ``stop`` ended the fit.
        """
        from .stops import EarlyStopping
        from .train import fit as train_fit

        mc, tc = self.config_.model, self.config_.train
        n = Xn.shape[0]
        stopped = []

        def on_epoch(rec, state):
            if callback is not None and callback(rec, state) is True:
                stopped.append(True)
                return True
            return False

        result = train_fit(
            Xn, yn, kernel=mc.kernel, backend=backend, mll_config=self._mll_config(n),
            optimizer=optimizer, epochs=tc.epochs, params0=params0, seed=tc.random_state,
            early_stopping=(EarlyStopping(tc.patience, tc.min_delta)
                            if tc.early_stopping else None),
            checkpoint_path=checkpoint, checkpoint_every=tc.checkpoint_every,
            checkpoint_seconds=tc.checkpoint_seconds,
            resume=resume,
            progress=_progress(progress, self.verbose),
            log_every=tc.log_every, callback=on_epoch, converge_tol=tc.converge_tol,
            settings=settings, stop=stop,
        )
        self.history_, self.stopped_reason_ = result.history, result.stopped_reason
        self.fit_info_ = result.info
        return result.params, bool(stopped) or result.info["stop_requested"]

    def _solve_alpha(self, backend) -> None:
        """Set ``alpha_`` and the prediction engine (``posterior_``, chosen in :meth:`_choose`).

        ``exact``: one blocked float64 Cholesky factor (:func:`gpadjoint.predict.exact_factor`),
        kept for :meth:`predict`. ``cg``: one CG solve, in float64 after the exact estimator
        (its precision) else in ``dtype``.
        """
        exact_post = self._posterior() == "exact"
        self.predict_dtype_ = ("float64" if exact_post or self.estimator_ == "exact"
                               else self.config_.model.dtype)
        self.solver_ = "cholesky" if exact_post else "cg"
        t0 = time.time()
        if exact_post:
            self._exact_cache = {}
            self.alpha_ = np.asarray(self._exact_factor().alpha)
            self.solve_info_ = {"iterations": 0, "residual": None, "seconds": time.time() - t0}
            return
        Xn, yn = self._internal_train(jnp.dtype(self.predict_dtype_))
        alpha, info = gpred.mean_weights(
            Xn, yn, self._params(self.predict_dtype_), backend=backend,
            noise_floor=self.config_.model.noise_floor, precond_rank=self._predict_rank(),
            tol=self._predict_tol(), max_iter=self.config_.predict.max_cg_iter,
        )
        self.alpha_ = np.asarray(alpha)
        self.solve_info_ = {
            "iterations": int(info.iterations),
            "residual": float(np.max(np.asarray(info.residual))),
            "seconds": time.time() - t0,
        }

    def _posterior(self) -> str:
        return self.plan_.posterior.name

    def _exact_factor(self):
        """Return the blocked float64 factor at the fitted parameters, built on first use."""
        cache = self.__dict__.setdefault("_exact_cache", {})
        if "factor" not in cache:
            Xn = (self.X_train_ - self.x_mean_) / self.x_std_
            yn = (self.y_train_ - self.y_mean_) / self.y_std_
            cache["factor"] = gpred.exact_factor(
                Xn, yn, self._params("float64"), kernel=self.config_.model.kernel,
                noise_floor=self.config_.model.noise_floor)
        return cache["factor"]

    def _mll_config(self, n: int) -> MLLConfig:
        """Return the [mll] settings with the plan's estimator; depth, rank, cg_min_iter <= n."""
        mll = self.plan_.mll_config(self.config_.mll)
        return dataclasses.replace(
            mll, lanczos_depth=min(mll.lanczos_depth, n), precond_rank=min(mll.precond_rank, n),
            cg_min_iter=min(mll.cg_min_iter, n),
        )

    def _predict_rank(self) -> int:
        # prediction's CG keeps a preconditioner of rank >= 15 even when training ran without
        return int(min(max(self.config_.mll.precond_rank, 15), self.X_train_.shape[0]))

    def _predict_tol(self) -> float:
        tol = self.config_.predict.cg_tol
        if self._predict_dtype() != self.config_.model.dtype:
            # predicting in float64 after a float32 fit (the exact estimator): float64's accuracy
            tol = min(tol, gpred.default_cg_tol(jnp.dtype(self._predict_dtype())))
        return float(tol)

    def _internal_train(self, dtype):
        Xn = jnp.asarray((self.X_train_ - self.x_mean_) / self.x_std_, dtype)
        yn = jnp.asarray((self.y_train_ - self.y_mean_) / self.y_std_, dtype)
        mesh = make_mesh(self.devices)
        if mesh is not None:
            Xn, yn = shard_rows(mesh, Xn), shard_rows(mesh, yn)
        return Xn, yn

    def _predict_dtype(self) -> str:
        return getattr(self, "predict_dtype_", self.config_.model.dtype)

    def _params(self, dtype=None) -> Params:
        dtype = jnp.dtype(dtype or self.config_.model.dtype)
        return Params(*(jnp.asarray(p, dtype) for p in self.params_))

    def _hyperparameters(self) -> dict:
        # in float64 from the stored raw values, whatever the working dtype: these are the
        # parameters float64 prediction uses, and float32 rounding of them is amplified by
        # cond(K) once the noise nears its floor
        h = constrain(self._params("float64"), self.config_.model.noise_floor)
        return hyperparameters_in_data_units(
            {"lengthscale": h.lengthscale, "outputscale": h.outputscale, "noise": h.noise,
             "mean": self.params_.mean}, self.x_std_, self.y_mean_, self.y_std_)

    # --- predict ------------------------------------------------------------------------------

    @_x64
    def predict(self, X, return_std=False):
        """Posterior mean at X (m, d), in y's units; with ``return_std`` also its std.

        The std is that of a new noisy observation (latent variance + noise), as scikit-learn's
        GaussianProcessRegressor gives with a WhiteKernel; it is >= sqrt(noise) and finite.
        """
        check_is_fitted(self)
        if self.alpha_ is None:
            raise ValueError("this model's fit was stopped by its callback before the "
                             "posterior was solved; fit again (resume=True continues from "
                             "its checkpoint)")
        X = self._validate_predict(X)
        cfg = self.config_
        if self._posterior() == "exact":
            mean, var = gpred.exact_posterior(
                self._exact_factor(), (X - self.x_mean_) / self.x_std_,
                batch_size=cfg.predict.batch_size)
            mean = mean * self.y_std_ + self.y_mean_
            return (mean, np.sqrt(var) * self.y_std_) if return_std else mean
        kernel, floor = cfg.model.kernel, cfg.model.noise_floor
        dtype = jnp.dtype(self._predict_dtype())
        Xs = jnp.asarray((X - self.x_mean_) / self.x_std_, dtype)
        Xn, yn = self._internal_train(dtype)
        params = self._params(dtype)
        mean = gpred.predict_mean(
            Xs, Xn, jnp.asarray(self.alpha_, dtype), params, kernel=kernel, noise_floor=floor,
            batch_size=cfg.predict.batch_size,
        )
        mean = np.asarray(mean, np.float64) * self.y_std_ + self.y_mean_
        if not return_std:
            return mean
        backend = make_backend(self.backend_, kernel, tile=cfg.model.tile,
                               mesh=make_mesh(self.devices),
                               precision=backend_precision(self.backend_, cfg.model))
        love_R = None
        if self.variance_ == "love":
            love_R = self._love_root(Xn, yn, params, backend)
        var = gpred.predict_variance(
            Xs, Xn, params, backend=backend, method=self.variance_, include_noise=True,
            noise_floor=floor, precond_rank=self._predict_rank(), tol=self._predict_tol(),
            max_iter=cfg.predict.max_cg_iter, love_R=love_R, batch_size=cfg.predict.batch_size,
        )
        std = np.sqrt(np.asarray(var, np.float64)) * self.y_std_
        return mean, std

    def _love_root(self, Xn, yn, params, backend):
        """Return the LOVE root, computed on first use and cached (also stored by :meth:`save`)."""
        cache = self.__dict__.setdefault("_love_cache", {})
        rank = int(min(self.config_.predict.love_rank, Xn.shape[0]))
        if cache.get("rank") != rank:
            R = gpred.love_root(
                Xn, yn, params, backend=backend, rank=rank,
                noise_floor=self.config_.model.noise_floor,
            )
            cache.update(rank=rank, R=np.asarray(R))
        return jnp.asarray(cache["R"])

    # --- persistence --------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the fitted model to ``path`` (one ``.npz``; atomic: temp file + os.replace).

        The settings are stored resolved (every key, as fitted), so a loaded model refits as
        this one did whatever the packaged defaults are then; an optax optimiser object is not
        stored (a loaded model has ``optimizer = "auto"``, which only matters for a refit).
        The format is :mod:`gpadjoint.persist`'s.
        """
        check_is_fitted(self)
        if self.alpha_ is None:
            raise ValueError("this model's fit was interrupted before the posterior was "
                             "solved; there is nothing to save yet")
        return save_model(self, path)

    @classmethod
    @_x64
    def load(cls, path) -> GPRegressor:
        """Read a model written by :meth:`save`; it predicts without refitting.

        Raises FileNotFoundError if absent and :class:`~gpadjoint._io.ReadError` (a ValueError
        naming the file and what to do) if it is damaged or not a gpadjoint model file.
        """
        return load_model(cls, path)


def _plain(v):
    """Return a numpy scalar as the Python value it holds (settings are checked as TOML)."""
    return v.item() if isinstance(v, np.generic) else v


def _progress(progress, verbose):
    if progress is None:
        return bool(verbose)
    if progress == "auto":
        return None  # the trainer's rule: a progress line when stderr is a terminal
    return bool(progress)
