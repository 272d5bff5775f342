"""Saving and loading a fitted :class:`~gpadjoint.model.GPRegressor`: one ``.npz`` file.

The file holds plain arrays and one JSON metadata entry (no pickle) with everything prediction
needs -- training data, normalisation, parameters and the mean weights alpha -- so a loaded
model predicts the same numbers without refitting. It is written atomically (temporary file,
then ``os.replace``). Format ``gpadjoint-model-v2``; the metadata key ``plan`` (the fit's
:class:`~gpadjoint.plan.Plan`) is optional, so files written before it existed still load.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import optax

from . import __version__
from ._io import ReadError, atomic_write, read_npz
from .kernels import Params
from .plan import Choice, Plan
from .settings import RENAMED

MODEL_FORMAT = "gpadjoint-model-v2"
_PARAM_FIELDS = Params._fields
# what load_model needs from a model file: arrays, and keys of its JSON metadata
_MODEL_ARRAYS = ("X_train", "y_train", "x_mean", "x_std", "alpha",
                 *(f"params_{f}" for f in _PARAM_FIELDS))
_MODEL_META = ("settings", "unsaved_settings", "y_mean", "y_std", "backend", "backend_reason",
               "variance", "variance_reason", "estimator", "predict_dtype", "solver", "seed",
               "stopped_reason", "history", "feature_names_in")
_FIX = "fit and save the model again (gpadjoint fit ... --save-model PATH, or GPRegressor.save)"


def save_model(model, path) -> Path:
    """Write the fitted ``model`` to ``path``; return the path (see :meth:`GPRegressor.save`)."""
    path = Path(path)
    settings = model.config_.to_keywords()
    unsaved = ["optimizer"] if isinstance(model.optimizer, optax.GradientTransformation) else []
    settings["devices"] = model.devices if isinstance(model.devices, (int, str)) else None
    names = getattr(model, "feature_names_in_", None)
    meta = {
        "format": MODEL_FORMAT,
        "gpadjoint_version": __version__,
        "settings": settings,
        "unsaved_settings": unsaved,
        "y_mean": model.y_mean_,
        "y_std": model.y_std_,
        "backend": model.backend_,
        "backend_reason": model.backend_reason_,
        "variance": model.variance_,
        "variance_reason": model.variance_reason_,
        "estimator": model.estimator_,
        "predict_dtype": model.predict_dtype_,
        "solver": model.solver_,
        "seed": model.random_state_,
        "stopped_reason": model.stopped_reason_,
        "history": model.history_,
        "feature_names_in": None if names is None else [str(c) for c in names],
        "plan": model.plan_.to_dict(),
    }
    arrays = {
        "meta": np.asarray(json.dumps(meta)),
        "X_train": model.X_train_,
        "y_train": model.y_train_,
        "x_mean": model.x_mean_,
        "x_std": model.x_std_,
        "alpha": model.alpha_,
        **{f"params_{f}": np.asarray(v) for f, v in zip(_PARAM_FIELDS, model.params_)},
    }
    cache = getattr(model, "_love_cache", {})
    if "R" in cache:
        arrays["love_R"] = cache["R"]
    return atomic_write(path, lambda fh: np.savez(fh, **arrays), what="model file")


def load_model(cls, path):
    """Read a model file written by :func:`save_model` into a fitted ``cls`` instance.

    Raises FileNotFoundError if absent and :class:`~gpadjoint._io.ReadError` (a ValueError
    naming the file and what to do) if it is damaged or not a gpadjoint model file.
    """
    path = Path(path)
    data, meta = _read(path)
    if meta["unsaved_settings"]:
        warnings.warn(
            f"{path}: settings {meta['unsaved_settings']} were not JSON values and were "
            "not saved; they take their defaults (this affects refitting only)",
            stacklevel=3,
        )
    # files saved before the scikit-learn names: the same settings under their new names
    est = cls(**{RENAMED.get(k, k): v for k, v in meta["settings"].items()})
    est.config_ = est.run_config()
    est.X_train_, est.y_train_ = data["X_train"], data["y_train"]
    est.x_mean_, est.x_std_ = data["x_mean"], data["x_std"]
    est.y_mean_, est.y_std_ = float(meta["y_mean"]), float(meta["y_std"])
    est.params_ = Params(*(data[f"params_{f}"] for f in _PARAM_FIELDS))
    est.alpha_ = data["alpha"]
    est.plan_ = (Plan.from_dict(meta["plan"]) if meta.get("plan")
                 else _legacy_plan(meta, est.X_train_.shape, est.config_.model.dtype))
    est.predict_dtype_, est.solver_ = meta["predict_dtype"], meta["solver"]
    est.random_state_ = meta["seed"]
    est.stopped_reason_, est.history_ = meta["stopped_reason"], meta["history"]
    est.n_iter_ = len(est.history_)
    est.n_features_in_ = int(est.X_train_.shape[1])
    if meta["feature_names_in"] is not None:
        est.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
    est.hyperparameters_ = est._hyperparameters()
    est._love_cache = {}
    if "love_R" in data:
        est._love_cache.update(rank=int(data["love_R"].shape[1]), R=data["love_R"])
    return est


def _read(path: Path) -> tuple[dict, dict]:
    """Return (arrays, metadata) of a model file, or raise naming what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        data = read_npz(path)
        meta = json.loads(str(data["meta"])) if "meta" in data else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise ReadError(f"{path} is not a readable gpadjoint model file (damaged, or "
                        f"another kind of file: {e}); {_FIX}") from None
    if not isinstance(meta, dict):
        raise ReadError(f"{path} is not a {MODEL_FORMAT} file (no metadata); {_FIX}")
    if meta.get("format") != MODEL_FORMAT:
        raise ReadError(
            f"{path} is a {meta.get('format')!r} file, expected {MODEL_FORMAT}; files of "
            "gpadjoint-model-v1 (before the settings took their config names) cannot be "
            "read: refit and save again")
    missing = [k for k in _MODEL_ARRAYS if k not in data] + [
        k for k in _MODEL_META if k not in meta]
    if missing:
        raise ReadError(f"{path} lacks the model entries {', '.join(missing)}; {_FIX}")
    return data, meta


def _legacy_plan(meta: dict, shape, dtype: str) -> Plan:
    """Rebuild the plan of a model file written before plans were saved, from its keys.

    Such a file recorded no estimator or optimiser reason and no posterior: its ``cholesky``
    solver was the exact posterior.
    """
    unknown = "not recorded in this model file"
    n, d = (int(v) for v in shape)
    posterior = "exact" if meta["solver"] == "cholesky" else "cg"
    return Plan(
        n=n, d=d, dtype=dtype,
        backend=Choice(meta["backend"], meta["backend_reason"]),
        mesh=Choice("single device" if meta["settings"].get("devices") is None
                    else f"devices = {meta['settings']['devices']}", unknown),
        estimator=Choice(meta["estimator"], unknown),
        optimizer=Choice(meta["settings"].get("optimizer") or "auto", unknown),
        posterior=Choice(posterior, f"{unknown}; the {meta['solver']} solver"),
        variance=Choice(meta["variance"], meta["variance_reason"]),
    )
