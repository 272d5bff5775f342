"""Run configuration: TOML files -> frozen dataclasses (config is data).

A run is described by one :class:`RunConfig` with five sections, each a frozen dataclass:

``model``    kernel, matvec backend, working dtype, noise floor, blocked tile size
``mll``      the estimator's settings: :class:`gpadjoint.settings.MLLConfig` itself, the one
             dataclass mll.py, this module and GPRegressor share (its ``noise_floor`` is
             the [model] key)
``optim``    optax optimiser, learning rate and schedule
``train``    epochs, random_state, early stopping, checkpoints, initialisation, logging
``predict``  CG settings and the variance method for prediction

:func:`load_config` reads a TOML file (stdlib ``tomllib``); unknown keys and wrong types raise
:class:`ValueError` naming the section and key. The defaults live in one file shipped inside the
package, ``gpadjoint/default.toml`` (:data:`DEFAULT_CONFIG`, :func:`default_config`), which
documents every key; an installed wheel reads the same file. A key missing from a file, a
section's dataclass default and ``RunConfig()`` all take its value (only :class:`MLLConfig`
alone keeps the low-level defaults of :func:`gpadjoint.mll.neg_mll`). :func:`keywords` names
every setting with one flat name, GPRegressor's keyword arguments. ``configs/paper.toml`` is the
paper's setup.

Where scikit-learn has a name for a setting, the key is that name (``[train] random_state``,
``[model] normalize_y``); the old keys ``seed`` and ``scale_y`` fail with an error naming the
new one (:data:`gpadjoint.settings.RENAMED`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

from .kernels import KERNEL_NAMES
from .matvec import BACKENDS, PRECISIONS
from .settings import MLLConfig, Section, unknown_key_hint

# The packaged defaults (package data, so an installed wheel has them too): the one place the
# defaults of a run live. Every section's field defaults below are read from it.
DEFAULT_CONFIG = Path(__file__).with_name("default.toml")


def _read_toml(path: Path) -> dict:
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None


_DEFAULTS = _read_toml(DEFAULT_CONFIG)

DTYPES = ("float32", "float64")
OPTIMIZERS = ("auto", "adam", "adamw", "sgd", "lbfgs")
SCHEDULES = ("constant", "cosine", "exponential")
INITS = ("softplus0", "normal")
VARIANCES = ("exact", "love", "auto")
POSTERIORS = ("auto", "exact", "cg")
FULL_FITS = ("auto", "always", "never")


@dataclass(frozen=True)
class ModelConfig(Section):
    """The GP model and how its matvecs run.

    kernel: profile name (:data:`gpadjoint.kernels.KERNEL_NAMES`); backend: "auto" or one of
    :data:`gpadjoint.matvec.BACKENDS`; dtype: working precision of X, y and the parameters;
    noise_floor: lower bound of the noise variance (normalised target units squared);
    tile: rows per tile of the blocked backend (and of the stored one's build and gradient);
    precision: the blocked backend's kernel entries in the working dtype ("full") or in
    float32 ("mixed"); normalize_y: standardise targets to unit variance (training statistics)
    as well as centring them (always done); results are reported in the target's units.
    """

    SECTION: ClassVar[str] = "model"
    _TYPES: ClassVar[dict[str, type]] = {
        "kernel": str, "backend": str, "dtype": str, "noise_floor": float, "tile": int,
        "normalize_y": bool, "precision": str,
    }

    kernel: str = _DEFAULTS["model"]["kernel"]
    backend: str = _DEFAULTS["model"]["backend"]
    dtype: str = _DEFAULTS["model"]["dtype"]
    noise_floor: float = _DEFAULTS["model"]["noise_floor"]
    tile: int = _DEFAULTS["model"]["tile"]
    normalize_y: bool = _DEFAULTS["model"]["normalize_y"]
    precision: str = _DEFAULTS["model"]["precision"]

    def _validate(self):
        self._choice("kernel", KERNEL_NAMES)
        self._choice("backend", ("auto",) + BACKENDS)
        self._choice("precision", PRECISIONS)
        self._choice("dtype", DTYPES)
        self._non_negative("noise_floor")
        self._positive("tile")


@dataclass(frozen=True)
class OptimConfig(Section):
    """The optax optimiser, one step per epoch (built by :mod:`gpadjoint.optimizers`)."""

    SECTION: ClassVar[str] = "optim"
    _TYPES: ClassVar[dict[str, type]] = {
        "optimizer": str, "lr": float, "schedule": str, "decay_epochs": int,
        "final_lr_fraction": float, "decay_rate": float, "warmup_epochs": int, "b1": float,
        "b2": float, "eps": float, "momentum": float, "weight_decay": float, "clip_norm": float,
        "lbfgs_memory": int, "lbfgs_rtol": float, "lbfgs_gtol": float, "lbfgs_ptol": float,
    }

    optimizer: str = _DEFAULTS["optim"]["optimizer"]
    lr: float = _DEFAULTS["optim"]["lr"]
    schedule: str = _DEFAULTS["optim"]["schedule"]
    decay_epochs: int = _DEFAULTS["optim"]["decay_epochs"]
    final_lr_fraction: float = _DEFAULTS["optim"]["final_lr_fraction"]
    decay_rate: float = _DEFAULTS["optim"]["decay_rate"]
    warmup_epochs: int = _DEFAULTS["optim"]["warmup_epochs"]
    b1: float = _DEFAULTS["optim"]["b1"]
    b2: float = _DEFAULTS["optim"]["b2"]
    eps: float = _DEFAULTS["optim"]["eps"]
    momentum: float = _DEFAULTS["optim"]["momentum"]
    weight_decay: float = _DEFAULTS["optim"]["weight_decay"]
    clip_norm: float = _DEFAULTS["optim"]["clip_norm"]
    lbfgs_memory: int = _DEFAULTS["optim"]["lbfgs_memory"]
    lbfgs_rtol: float = _DEFAULTS["optim"]["lbfgs_rtol"]
    lbfgs_gtol: float = _DEFAULTS["optim"]["lbfgs_gtol"]
    lbfgs_ptol: float = _DEFAULTS["optim"]["lbfgs_ptol"]

    def _validate(self):
        self._choice("optimizer", OPTIMIZERS)
        self._choice("schedule", SCHEDULES)
        self._positive("lr", "eps", "lbfgs_memory")
        self._non_negative("lbfgs_rtol", "lbfgs_gtol", "lbfgs_ptol")
        self._non_negative(
            "decay_epochs", "final_lr_fraction", "warmup_epochs", "momentum", "weight_decay",
            "clip_norm",
        )
        for name in ("b1", "b2", "momentum"):
            if not getattr(self, name) < 1:
                self._fail(name, "must be < 1")
        self._non_negative("b1", "b2")
        if not 0 < self.decay_rate <= 1:
            self._fail("decay_rate", "must be in (0, 1]")


@dataclass(frozen=True)
class TrainConfig(Section):
    """The training loop (:func:`gpadjoint.train.fit`)."""

    SECTION: ClassVar[str] = "train"
    _TYPES: ClassVar[dict[str, type]] = {
        "epochs": int, "random_state": int, "early_stopping": bool, "patience": int,
        "min_delta": float, "checkpoint_every": int, "checkpoint_seconds": float, "init": str,
        "log_every": int,
        "converge_tol": float, "init_subset": int, "init_subset_max": int, "full_fit": str,
    }

    epochs: int = _DEFAULTS["train"]["epochs"]
    random_state: int = _DEFAULTS["train"]["random_state"]
    early_stopping: bool = _DEFAULTS["train"]["early_stopping"]
    patience: int = _DEFAULTS["train"]["patience"]
    min_delta: float = _DEFAULTS["train"]["min_delta"]
    checkpoint_every: int = _DEFAULTS["train"]["checkpoint_every"]
    checkpoint_seconds: float = _DEFAULTS["train"]["checkpoint_seconds"]
    init: str = _DEFAULTS["train"]["init"]
    log_every: int = _DEFAULTS["train"]["log_every"]
    converge_tol: float = _DEFAULTS["train"]["converge_tol"]
    init_subset: int = _DEFAULTS["train"]["init_subset"]
    init_subset_max: int = _DEFAULTS["train"]["init_subset_max"]
    full_fit: str = _DEFAULTS["train"]["full_fit"]

    def _validate(self):
        self._positive("patience", "log_every")
        self._non_negative("epochs", "random_state", "min_delta", "checkpoint_every",
                           "checkpoint_seconds", "converge_tol", "init_subset", "init_subset_max")
        if self.checkpoint_seconds == float("inf"):
            self._fail("checkpoint_seconds", "must be finite (0 turns checkpoints by time off)")
        self._choice("init", INITS)
        self._choice("full_fit", FULL_FITS)
        if self.full_fit == "never" and self.init_subset == 0:
            self._fail("full_fit", "'never' keeps the fit of init_subset rows, but init_subset "
                       "is 0: set init_subset > 0, or full_fit = 'always'")


@dataclass(frozen=True)
class PredictConfig(Section):
    """Prediction: CG for the posterior mean, method for the predictive variance."""

    SECTION: ClassVar[str] = "predict"
    _TYPES: ClassVar[dict[str, type]] = {
        "cg_tol": float, "max_cg_iter": int, "variance": str, "love_rank": int,
        "batch_size": int, "posterior": str,
    }

    posterior: str = _DEFAULTS["predict"]["posterior"]
    cg_tol: float = _DEFAULTS["predict"]["cg_tol"]
    max_cg_iter: int = _DEFAULTS["predict"]["max_cg_iter"]
    variance: str = _DEFAULTS["predict"]["variance"]
    love_rank: int = _DEFAULTS["predict"]["love_rank"]
    batch_size: int = _DEFAULTS["predict"]["batch_size"]

    def _validate(self):
        self._positive("cg_tol", "max_cg_iter", "love_rank", "batch_size")
        self._choice("variance", VARIANCES)
        self._choice("posterior", POSTERIORS)


_SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "mll": MLLConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "predict": PredictConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one frozen dataclass per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # MLLConfig's own defaults are the low-level API's (mll.neg_mll); a run's are default.toml's
    mll: MLLConfig = field(default_factory=lambda: MLLConfig.from_dict(_DEFAULTS["mll"]))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def __post_init__(self):
        # the estimator's noise floor is the model's (one key, [model] noise_floor)
        if self.mll.noise_floor != self.model.noise_floor:
            object.__setattr__(
                self, "mll", dataclasses.replace(self.mll, noise_floor=self.model.noise_floor))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from nested tables ``{section: {key: value}}``; missing keys: default.toml's."""
        for s in d:
            if s not in _SECTIONS:
                raise ValueError(
                    f"unknown section [{s}]; valid sections: {', '.join(_SECTIONS)}"
                )
            if not isinstance(d[s], dict):
                raise ValueError(f"[{s}] must be a table, got {type(d[s]).__name__}")
        return cls(**{s: c.from_dict({**_DEFAULTS[s], **d.get(s, {})})
                      for s, c in _SECTIONS.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain dict ``{section: {key: value}}`` (round-trips through from_dict)."""
        return {s: {k: getattr(getattr(self, s), k) for k in c.keys()}
                for s, c in _SECTIONS.items()}

    def mll_config(self) -> MLLConfig:
        """Return this run's estimator settings: the [mll] section, with model.noise_floor."""
        return self.mll

    def with_overrides(self, **kw) -> RunConfig:
        """Return a copy with some keys replaced, e.g. from command-line flags.

        Keys are ``section__key`` (``mll__cg_tol=1e-3``) or a bare key when only one section has
        it (``lr=0.1``, ``epochs=20``); ``section={...}`` replaces several keys of a section.
        ``None`` values are skipped (unset CLI flags). Values are validated as in a TOML file.
        """
        d = self.to_dict()
        for k, v in kw.items():
            if v is None:
                continue
            if k in _SECTIONS:
                if not isinstance(v, dict):
                    raise ValueError(f"override {k}= must be a dict of [{k}] keys")
                for kk, vv in v.items():
                    _set(d, k, kk, vv)
                continue
            if "__" in k:
                section, key = k.split("__", 1)
                if section not in _SECTIONS:
                    raise ValueError(
                        f"override {k!r}: unknown section {section!r}; "
                        f"valid sections: {', '.join(_SECTIONS)}"
                    )
                _set(d, section, key, v)
                continue
            owners = [s for s, c in _SECTIONS.items() if k in c.keys()]
            if not owners:
                valid = sorted({key for c in _SECTIONS.values() for key in c.keys()})
                raise ValueError(f"override: unknown key {k!r}{unknown_key_hint(k, valid)}; "
                                 f"valid keys: {', '.join(valid)}")
            if len(owners) > 1:
                raise ValueError(
                    f"override: key {k!r} is in several sections; write "
                    + " or ".join(f"{s}__{k}" for s in owners)
                )
            _set(d, owners[0], k, v)
        return RunConfig.from_dict(d)


    def with_keywords(self, **kw) -> RunConfig:
        """Return a copy with keys replaced by their :func:`keywords` names (GPRegressor's).

        ``None`` values are skipped (``None`` means "keep this config's value").
        """
        names = keywords()
        over = {}
        for k, v in kw.items():
            if k not in names:
                raise ValueError(f"unknown setting {k!r}{unknown_key_hint(k, names)}; valid "
                                 f"settings: {', '.join(names)}")
            section, key = names[k]
            over[f"{section}__{key}"] = v
        return self.with_overrides(**over)

    def to_keywords(self) -> dict[str, Any]:
        """Every setting under its :func:`keywords` name (``GPRegressor(**cfg.to_keywords())``)."""
        return {k: getattr(getattr(self, s), key) for k, (s, key) in keywords().items()}


def keywords() -> dict[str, tuple[str, str]]:
    """Return the flat name of every setting -> ``(section, key)``: one vocabulary for all.

    A setting's name is its TOML key; a [predict] key that another section also has takes the
    prefix ``predict_`` (``predict_cg_tol`` is [predict] cg_tol, ``cg_tol`` is [mll] cg_tol).
    These are :class:`gpadjoint.model.GPRegressor`'s keyword arguments.
    """
    out: dict[str, tuple[str, str]] = {}
    for s, c in _SECTIONS.items():
        others = {k for s2, c2 in _SECTIONS.items() if s2 != s for k in c2.keys()}
        for k in c.keys():
            name = f"predict_{k}" if s == "predict" and k in others else k
            if name in out:  # pragma: no cover - a new key that collides must be named here
                raise AssertionError(f"setting name {name!r} is in two sections")
            out[name] = (s, k)
    return out


def _set(d: dict, section: str, key: str, value):
    valid = _SECTIONS[section].keys()
    if key not in valid:
        raise ValueError(f"unknown key {key!r} in section [{section}]"
                         f"{unknown_key_hint(key, valid)}; valid keys: {', '.join(valid)}")
    d[section][key] = value


def load_config(path) -> RunConfig:
    """Read a TOML run configuration; errors name the file, section and key."""
    path = Path(path)
    raw = _read_toml(path)
    try:
        return RunConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def default_config() -> RunConfig:
    """Return the packaged defaults, :data:`DEFAULT_CONFIG` (``gpadjoint/default.toml``)."""
    return load_config(DEFAULT_CONFIG)
