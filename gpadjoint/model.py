"""GPRegressor: a scikit-learn estimator around the trainer and the posterior.

Stage 8 (train -> predict -> **model** -> cli). :class:`GPRegressor` follows scikit-learn's
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

import functools
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import __version__
from . import predict as gpred
from ._io import atomic_write
from .kernels import KERNEL_NAMES, NOISE_FLOOR, Params, constrain
from .matvec import BACKENDS, choose_backend, make_backend
from .mll import ESTIMATORS, MLLConfig, choose_estimator
from .sharding import describe_mesh, make_mesh, shard_rows

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(est, *args, **kwargs):
        return est._validate_data(*args, **kwargs)


MODEL_FORMAT = "gpadjoint-model-v1"
DTYPES = ("float64", "float32")
INITS = ("zero", "normal")
OPTIMIZERS = ("auto", "adam", "adamw", "sgd", "lbfgs")
_PARAM_FIELDS = Params._fields

# One optax object per (name, lr): the trainer caches its compiled step keyed on the optimizer
# object, so refitting with equal settings (cross-validation, clones) does not recompile.
_OPTIMIZER_CACHE: dict[tuple[str, float], optax.GradientTransformation] = {}


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


def _make_optimizer(name, lr, estimator: str) -> tuple[optax.GradientTransformation, str]:
    if isinstance(name, optax.GradientTransformation):
        return name, "given"
    from .config import OptimConfig, make_optimizer, resolve_optimizer

    name, _ = resolve_optimizer(name, estimator)
    key = (name, float(lr), estimator == "exact")
    if key not in _OPTIMIZER_CACHE:  # the same builder as the configs, defaults included
        _OPTIMIZER_CACHE[key] = make_optimizer(
            OptimConfig(optimizer=name, lr=float(lr)), estimator=estimator)
    return _OPTIMIZER_CACHE[key], name


class GPRegressor(RegressorMixin, BaseEstimator):
    """Gaussian-process regression with hyperparameters fitted by SLQ and the Lanczos adjoint.

    Args:
        kernel: "matern32" (default), "matern12", "matern52" or "rbf", with ARD lengthscales.
        backend: "auto" (:func:`gpadjoint.matvec.choose_backend`, reported in ``backend_``),
            "dense", "blocked" or "keops".
        estimator: "auto" (default: exact float64 Cholesky for n <= 2000, SLQ above; in
            ``estimator_``), "slq" or "exact" (:func:`gpadjoint.mll.choose_estimator`).
        num_probes, lanczos_depth, precond_rank, cg_tol, cg_max_iter: SLQ estimator
            settings (:class:`gpadjoint.mll.MLLConfig`); depth and rank are clamped to n.
            ``precond_rank`` and ``cg_max_iter`` also serve the prediction solves.
        precond_logdet: SLQ on P^{-1/2} K P^{-1/2} with the CG preconditioner P plus the
            exact log det P (:func:`gpadjoint.logdet.preconditioned_slq_logdet`).
        epochs: optimiser steps (full batch); 0 keeps the initial parameters. With the exact
            estimator training stops earlier once converged (loss change < 1e-6 for 5 steps).
        lr: learning rate of the named optimiser (not used by L-BFGS).
        optimizer: "auto" (default: L-BFGS with the exact estimator, Adam with SLQ), "adam",
            "adamw", "sgd", "lbfgs", or any ``optax.GradientTransformation`` (then ``lr`` is
            ignored).
        dtype: "float64" (default) or "float32". float64 is the default because this package
            mostly runs on CPUs, where float64 matmuls cost only ~2x float32, while in float32
            the solves lose most of their digits once the noise nears its floor (cond(K) ~
            s2 n / sigma2 reaches 1e5-1e7), which corrupts predictions and variances. Choose
            float32 on a GPU for large n.
        noise_floor: lower bound of the noise variance in internal units (y / y_std squared).
        normalize_y: divide y by its training std (y is always centred).
        init: "zero" (raw parameters 0: lengthscales, output scale and noise ~0.69) or
            "normal" (raw N(0, 1), drawn from the seed).
        predict_cg_tol: relative residual of the prediction solves; None: 1e-8 in float64,
            1e-3 in float32 (:data:`gpadjoint.predict.DEFAULT_CG_TOL`).
        variance: "auto", "exact" or "love" (:mod:`gpadjoint.predict`).
        love_rank: Lanczos depth of the LOVE root (clamped to n).
        random_state: int seed, a ``numpy.random.RandomState``, or None (a fresh seed per fit,
            recorded in ``seed_``).
        verbose: print the backend choice and a progress line while training.
        devices: None (one device, default), a number N or "all": shard the rows of the data
            and of every kernel block and Lanczos / CG vector over a mesh of that many devices
            (:mod:`gpadjoint.sharding`; described in ``mesh_``). Training with the SLQ estimator
            and prediction use the mesh; the exact estimator's dense Cholesky is not split.

    Fitted attributes: ``params_`` (unconstrained, internal units), ``alpha_`` (K^{-1}(y_n -
    mu)), ``hyperparameters_`` (original units), ``X_train_``, ``y_train_`` (as given),
    ``x_mean_``, ``x_std_``, ``y_mean_``, ``y_std_``, ``backend_``, ``backend_reason_``,
    ``estimator_``, ``estimator_reason_``, ``optimizer_``,
    ``variance_``, ``variance_reason_``, ``history_``, ``stopped_reason_``, ``n_iter_``,
    ``seed_``, ``n_features_in_``, ``predict_dtype_`` and ``solver_`` (``"float64"`` and
    ``"cholesky"`` after the exact estimator, whatever ``dtype``; else ``dtype`` and ``"cg"``).
    """

    def __init__(
        self,
        *,
        kernel="matern32",
        backend="auto",
        estimator="auto",
        num_probes=10,
        lanczos_depth=10,
        precond_rank=15,
        precond_logdet=True,
        cg_tol=1e-2,
        cg_max_iter=1000,
        epochs=50,
        lr=0.05,
        optimizer="auto",
        dtype="float64",
        noise_floor=NOISE_FLOOR,
        normalize_y=True,
        init="zero",
        predict_cg_tol=None,
        variance="auto",
        love_rank=100,
        random_state=None,
        verbose=False,
        devices=None,
    ):
        self.kernel = kernel
        self.backend = backend
        self.estimator = estimator
        self.num_probes = num_probes
        self.lanczos_depth = lanczos_depth
        self.precond_rank = precond_rank
        self.precond_logdet = precond_logdet
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer
        self.dtype = dtype
        self.noise_floor = noise_floor
        self.normalize_y = normalize_y
        self.init = init
        self.predict_cg_tol = predict_cg_tol
        self.variance = variance
        self.love_rank = love_rank
        self.random_state = random_state
        self.verbose = verbose
        self.devices = devices

    # --- validation ---------------------------------------------------------------------------

    def _check_settings(self) -> None:
        def choice(name, options):
            v = getattr(self, name)
            if not (isinstance(v, str) and v in options):
                raise ValueError(f"{name}={v!r} is not valid; choose one of {', '.join(options)}")

        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        def number(name, low, strict):
            v = getattr(self, name)
            ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            ok = ok and np.isfinite(v) and (v > low if strict else v >= low)
            if not ok:
                raise ValueError(f"{name} must be a number {'>' if strict else '>='} {low}, "
                                 f"got {v!r}")

        choice("kernel", KERNEL_NAMES)
        choice("backend", ("auto",) + BACKENDS)
        choice("estimator", ESTIMATORS)
        choice("dtype", DTYPES)
        choice("init", INITS)
        choice("variance", gpred.VARIANCE_METHODS)
        if not isinstance(self.optimizer, optax.GradientTransformation):
            choice("optimizer", OPTIMIZERS)
        for name in ("num_probes", "lanczos_depth", "cg_max_iter", "love_rank"):
            integer(name, 1)
        integer("precond_rank", 0)
        if not isinstance(self.precond_logdet, (bool, np.bool_)):
            raise ValueError(f"precond_logdet must be True or False, got {self.precond_logdet!r}")
        integer("epochs", 0)
        number("cg_tol", 0, True)
        number("lr", 0, True)
        number("noise_floor", 0, False)
        if self.predict_cg_tol is not None:
            number("predict_cg_tol", 0, True)

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
    def fit(self, X, y):
        """Fit the hyperparameters to X (n, d) and y (n,) and precompute the posterior mean.

        Returns self.
        """
        from .train import fit as train_fit
        from .train import initial_params

        self._check_settings()
        X, y = self._validate_fit(X, y)
        n, d = X.shape
        dtype = jnp.dtype(self.dtype)

        from .data import normalisation

        x_mean, x_std, y_mean, y_std = normalisation(X, y, self.normalize_y)
        self.X_train_, self.y_train_ = X, y
        self.x_mean_, self.x_std_, self.y_mean_, self.y_std_ = x_mean, x_std, y_mean, y_std
        Xn, yn = self._internal_train(dtype)

        if self.backend == "auto":
            name, reason = choose_backend(n, dtype)
            reason = f"auto: {reason}"
        else:
            name, reason = self.backend, "requested"
        mesh = make_mesh(self.devices)
        self.mesh_ = describe_mesh(mesh)
        backend = make_backend(name, self.kernel, mesh=mesh)
        self.backend_, self.backend_reason_ = name, reason
        if self.variance == "auto":
            self.variance_, why = gpred.choose_variance(n)
            self.variance_reason_ = f"auto: {why}"
        else:
            self.variance_, self.variance_reason_ = self.variance, "requested"
        mll_config = self._mll_config(n)
        self.estimator_, self.estimator_reason_ = choose_estimator(n, mll_config)
        optimizer, self.optimizer_ = _make_optimizer(self.optimizer, self.lr, self.estimator_)
        if self.verbose:
            print(f"GPRegressor: n={n}, d={d}, {self.dtype}, kernel {self.kernel}; "
                  f"backend {name} ({reason}); estimator {self.estimator_} "
                  f"({self.estimator_reason_}); optimiser {self.optimizer_}; "
                  f"variance {self.variance_}; mesh: {self.mesh_}")

        self.seed_ = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        init = "softplus0" if self.init == "zero" else "normal"
        params0 = initial_params(init, d, dtype, self.seed_)
        if self.epochs > 0:
            result = train_fit(
                Xn, yn, kernel=self.kernel, backend=backend, mll_config=mll_config,
                optimizer=optimizer, epochs=int(self.epochs),
                params0=params0, seed=self.seed_, progress=bool(self.verbose),
            )
            params, self.history_, self.stopped_reason_ = (
                result.params, result.history, result.stopped_reason
            )
        else:
            params, self.history_, self.stopped_reason_ = params0, [], "epochs=0: not trained"
        self.n_iter_ = len(self.history_)
        self.params_ = Params(*(np.asarray(p) for p in params))
        self._solve_alpha(backend)
        self.hyperparameters_ = self._hyperparameters()
        self._love_cache = {}
        return self

    def _solve_alpha(self, backend) -> None:
        """Set ``alpha_`` and the prediction engine that follows the estimator.

        Prediction works in the precision the loss was computed in (the exact estimator's
        float64, else ``dtype``) and, after the exact estimator, by the same dense Cholesky:
        exact where CG's relative tolerance is not (the variance cancels catastrophically when
        the noise is tiny next to the signal).
        """
        self.predict_dtype_ = "float64" if self.estimator_ == "exact" else self.dtype
        self.solver_ = "cholesky" if self.estimator_ == "exact" else "cg"
        Xn, yn = self._internal_train(jnp.dtype(self.predict_dtype_))
        alpha, _ = gpred.mean_weights(
            Xn, yn, self._params(self.predict_dtype_), backend=backend, solver=self.solver_,
            noise_floor=self.noise_floor, precond_rank=self.precond_rank,
            tol=self._predict_tol(), max_iter=self.cg_max_iter,
        )
        self.alpha_ = np.asarray(alpha)

    def _mll_config(self, n: int) -> MLLConfig:
        return MLLConfig(
            num_probes=int(self.num_probes),
            lanczos_depth=int(min(self.lanczos_depth, n)),
            precond_rank=int(min(self.precond_rank, n)),
            cg_tol=float(self.cg_tol),
            cg_min_iter=int(min(10, n, self.cg_max_iter)),
            cg_max_iter=int(self.cg_max_iter),
            noise_floor=float(self.noise_floor),
            estimator=self.estimator,
            precond_logdet=bool(self.precond_logdet),
        )

    def _predict_tol(self) -> float:
        if self.predict_cg_tol is None:
            return gpred.default_cg_tol(self._predict_dtype())
        return float(self.predict_cg_tol)

    def _internal_train(self, dtype):
        Xn = jnp.asarray((self.X_train_ - self.x_mean_) / self.x_std_, dtype)
        yn = jnp.asarray((self.y_train_ - self.y_mean_) / self.y_std_, dtype)
        mesh = make_mesh(getattr(self, "devices", None))
        if mesh is not None:
            Xn, yn = shard_rows(mesh, Xn), shard_rows(mesh, yn)
        return Xn, yn

    def _predict_dtype(self) -> str:
        return getattr(self, "predict_dtype_", self.dtype)

    def _params(self, dtype=None) -> Params:
        dtype = jnp.dtype(dtype or self.dtype)
        return Params(*(jnp.asarray(p, dtype) for p in self.params_))

    def _hyperparameters(self) -> dict:
        h = constrain(self._params(), self.noise_floor)
        y2 = self.y_std_**2
        return {
            "lengthscale": np.asarray(h.lengthscale, np.float64) * self.x_std_,
            "outputscale": float(h.outputscale) * y2,
            "noise": float(h.noise) * y2,
            "mean": float(self.params_.mean) * self.y_std_ + self.y_mean_,
        }

    # --- predict ------------------------------------------------------------------------------

    @_x64
    def predict(self, X, return_std=False):
        """Posterior mean at X (m, d), in y's units; with ``return_std`` also its std.

        The std is that of a new noisy observation (latent variance + noise), as scikit-learn's
        GaussianProcessRegressor gives with a WhiteKernel; it is >= sqrt(noise) and finite.
        """
        check_is_fitted(self)
        X = self._validate_predict(X)
        dtype = jnp.dtype(self._predict_dtype())
        Xs = jnp.asarray((X - self.x_mean_) / self.x_std_, dtype)
        Xn, yn = self._internal_train(dtype)
        params = self._params(dtype)
        mean = gpred.predict_mean(
            Xs, Xn, jnp.asarray(self.alpha_, dtype), params, kernel=self.kernel,
            noise_floor=self.noise_floor,
        )
        mean = np.asarray(mean, np.float64) * self.y_std_ + self.y_mean_
        if not return_std:
            return mean
        backend = make_backend(
            self.backend_, self.kernel, mesh=make_mesh(getattr(self, "devices", None))
        )
        love_R = None
        if self.variance_ == "love":
            love_R = self._love_root(Xn, yn, params, backend)
        var = gpred.predict_variance(
            Xs, Xn, params, backend=backend, method=self.variance_, include_noise=True,
            noise_floor=self.noise_floor, precond_rank=self.precond_rank,
            tol=self._predict_tol(), max_iter=self.cg_max_iter, love_R=love_R,
            solver=getattr(self, "solver_", "cg"),
        )
        std = np.sqrt(np.asarray(var, np.float64)) * self.y_std_
        return mean, std

    def _love_root(self, Xn, yn, params, backend):
        """Return the LOVE root, computed on first use and cached (also stored by :meth:`save`)."""
        cache = self.__dict__.setdefault("_love_cache", {})
        rank = int(min(self.love_rank, Xn.shape[0]))
        if cache.get("rank") != rank:
            R = gpred.love_root(
                Xn, yn, params, backend=backend, rank=rank, noise_floor=self.noise_floor
            )
            cache.update(rank=rank, R=np.asarray(R))
        return jnp.asarray(cache["R"])

    # --- persistence --------------------------------------------------------------------------

    def save(self, path) -> Path:
        """Write the fitted model to ``path`` (one ``.npz``; atomic: temp file + os.replace).

        Estimator settings that are not JSON values (an optax optimizer object, a RandomState)
        are not stored; a loaded model has their defaults there, which only matters for a refit.
        """
        check_is_fitted(self)
        path = Path(path)
        settings, unsaved = {}, []
        for k, v in self.get_params().items():
            try:
                json.dumps(v)
                settings[k] = v
            except TypeError:
                unsaved.append(k)
        meta = {
            "format": MODEL_FORMAT,
            "gpadjoint_version": __version__,
            "settings": settings,
            "unsaved_settings": unsaved,
            "y_mean": self.y_mean_,
            "y_std": self.y_std_,
            "backend": self.backend_,
            "backend_reason": self.backend_reason_,
            "variance": self.variance_,
            "variance_reason": self.variance_reason_,
            "predict_dtype": self._predict_dtype(),
            "solver": getattr(self, "solver_", "cg"),
            "seed": self.seed_,
            "stopped_reason": self.stopped_reason_,
            "history": self.history_,
            "feature_names_in": (
                [str(c) for c in self.feature_names_in_]
                if hasattr(self, "feature_names_in_") else None
            ),
        }
        arrays = {
            "meta": np.asarray(json.dumps(meta)),
            "X_train": self.X_train_,
            "y_train": self.y_train_,
            "x_mean": self.x_mean_,
            "x_std": self.x_std_,
            "alpha": self.alpha_,
            **{f"params_{f}": np.asarray(v) for f, v in zip(_PARAM_FIELDS, self.params_)},
        }
        cache = getattr(self, "_love_cache", {})
        if "R" in cache:
            arrays["love_R"] = cache["R"]
        return atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    @_x64
    def load(cls, path) -> GPRegressor:
        """Read a model written by :meth:`save`; it predicts without refitting."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        if "meta" not in data:
            raise ValueError(f"{path} is not a {MODEL_FORMAT} file (no metadata)")
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} is a {meta.get('format')!r} file, expected {MODEL_FORMAT}")
        if meta["unsaved_settings"]:
            warnings.warn(
                f"{path}: settings {meta['unsaved_settings']} were not JSON values and were "
                "not saved; they take their defaults (this affects refitting only)",
                stacklevel=2,
            )
        est = cls(**meta["settings"])
        est.X_train_ = data["X_train"]
        est.y_train_ = data["y_train"]
        est.x_mean_, est.x_std_ = data["x_mean"], data["x_std"]
        est.y_mean_, est.y_std_ = float(meta["y_mean"]), float(meta["y_std"])
        est.params_ = Params(*(data[f"params_{f}"] for f in _PARAM_FIELDS))
        est.alpha_ = data["alpha"]
        est.backend_, est.backend_reason_ = meta["backend"], meta["backend_reason"]
        est.variance_, est.variance_reason_ = meta["variance"], meta["variance_reason"]
        est.predict_dtype_ = meta.get("predict_dtype", est.dtype)
        est.solver_ = meta.get("solver", "cg")
        est.seed_ = meta["seed"]
        est.stopped_reason_ = meta["stopped_reason"]
        est.history_ = meta["history"]
        est.n_iter_ = len(est.history_)
        est.n_features_in_ = int(est.X_train_.shape[1])
        if meta["feature_names_in"] is not None:
            est.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
        est.hyperparameters_ = est._hyperparameters()
        est._love_cache = {}
        if "love_R" in data:
            est._love_cache.update(rank=int(data["love_R"].shape[1]), R=data["love_R"])
        return est

    @classmethod
    @_x64
    def from_fitted(
        cls,
        *,
        X_train,
        y_train,
        params: Params,
        split=None,
        config=None,
        backend: str = "dense",
        x_mean=None,
        x_std=None,
        y_mean: float = 0.0,
        y_std: float = 1.0,
        history=None,
        stopped_reason: str = "fitted outside GPRegressor",
        **settings,
    ) -> GPRegressor:
        """Wrap parameters trained elsewhere (e.g. by the CLI) as a fitted model.

        ``X_train`` (n, d) and ``y_train`` (n,) are in the *internal* (normalised) units the
        parameters were trained in; the normalisation comes from ``split``
        (:class:`gpadjoint.data.Split`) or from ``x_mean``/``x_std``/``y_mean``/``y_std``.
        ``config`` (:class:`gpadjoint.config.RunConfig`) supplies the estimator settings;
        ``settings`` override them. The mean weights alpha are solved here.
        """
        if split is not None:
            x_mean, x_std = split.x_mean, split.x_std
            y_mean, y_std = split.y_mean, split.y_std
        Xn = np.asarray(X_train, np.float64)
        d = Xn.shape[1]
        x_mean = np.zeros(d) if x_mean is None else np.asarray(x_mean, np.float64)
        x_std = np.ones(d) if x_std is None else np.asarray(x_std, np.float64)
        kw = {}
        if config is not None:
            m, mll, opt = config.model, config.mll, config.optim
            tr, pr = config.train, config.predict
            kw = dict(
                kernel=m.kernel, backend=m.backend, dtype=m.dtype, noise_floor=m.noise_floor,
                num_probes=mll.num_probes, lanczos_depth=mll.lanczos_depth,
                precond_rank=mll.precond_rank, cg_tol=mll.cg_tol, cg_max_iter=mll.cg_max_iter,
                estimator=mll.estimator, precond_logdet=mll.precond_logdet,
                epochs=tr.epochs, lr=opt.lr,
                optimizer=opt.optimizer if opt.optimizer in OPTIMIZERS else "adam",
                init="zero" if tr.init == "softplus0" else "normal", random_state=tr.seed,
                predict_cg_tol=pr.cg_tol, variance=pr.variance, love_rank=pr.love_rank,
                normalize_y=float(y_std) != 1.0,
            )
        kw.update(settings)
        est = cls(**kw)
        est._check_settings()
        est.X_train_ = Xn * x_std + x_mean
        est.y_train_ = np.asarray(y_train, np.float64) * float(y_std) + float(y_mean)
        est.x_mean_, est.x_std_ = x_mean, x_std
        est.y_mean_, est.y_std_ = float(y_mean), float(y_std)
        est.n_features_in_ = d
        n = Xn.shape[0]
        est.backend_, est.backend_reason_ = backend, "given"
        est.variance_, est.variance_reason_ = (
            gpred.choose_variance(n) if est.variance == "auto" else (est.variance, "requested")
        )
        est.seed_ = int(est.random_state) if isinstance(est.random_state, int) else 0
        est.history_ = [] if history is None else list(history)
        est.stopped_reason_ = stopped_reason
        est.n_iter_ = len(est.history_)
        est.params_ = Params(*(np.asarray(p) for p in params))
        est.estimator_, est.estimator_reason_ = choose_estimator(n, est._mll_config(n))
        est._solve_alpha(make_backend(backend, est.kernel))
        est.hyperparameters_ = est._hyperparameters()
        est._love_cache = {}
        return est
